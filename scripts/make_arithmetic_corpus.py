#!/usr/bin/env python
"""Write the tiny demo's corpus: synthetic arithmetic, where the digits after "=" can only be
predicted by computing them (the tokens a thought should help with) and everything else is easy.

Each document (separated by a blank line) is 3-6 lines such as ``38+47=85``, ``12+7+30=49``,
``91-16=75`` or ``7*8=56``. Deterministic: the same seed writes the same bytes.

    python scripts/make_arithmetic_corpus.py            # -> qstar/demo_data/arithmetic.txt
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "qstar" / "demo_data" / "arithmetic.txt"


def equation(rng: random.Random) -> str:
    kind = rng.choices(["add", "add3", "sub", "mul"], weights=[4, 2, 2, 1])[0]
    if kind == "add":
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return f"{a}+{b}={a + b}"
    if kind == "add3":
        a, b, c = rng.randint(1, 50), rng.randint(1, 50), rng.randint(1, 50)
        return f"{a}+{b}+{c}={a + b + c}"
    if kind == "sub":
        a, b = sorted((rng.randint(1, 99), rng.randint(1, 99)), reverse=True)
        return f"{a}-{b}={a - b}"
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"{a}*{b}={a * b}"


def make_corpus(n_documents: int, seed: int) -> str:
    rng = random.Random(seed)
    docs = ["\n".join(equation(rng) for _ in range(rng.randint(3, 6))) for _ in range(n_documents)]
    return "\n\n".join(docs) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    text = make_corpus(args.documents, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(text)} characters, {args.documents} documents)")


if __name__ == "__main__":
    main()
