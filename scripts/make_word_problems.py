#!/usr/bin/env python
"""Write the shipped word-problem corpus: ``qstar/demo_data/word_problems_train.jsonl`` and
``word_problems_heldout.jsonl`` (``qstar/word_problems.py`` says what a record holds and how the
split is made). Deterministic: the same arguments write the same bytes, and the defaults write the
shipped files (a test checks it).

    python scripts/make_word_problems.py                  # -> qstar/demo_data/word_problems_*.jsonl
    python scripts/make_word_problems.py --train 20000 --seed 1 --out-dir /tmp/more
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# This checkout's qstar, not an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qstar.word_problems import HELDOUT_PATH, TRAIN_PATH, make_splits, to_jsonl  # noqa: E402

SEED = 0
N_TRAIN = 2000
N_HELDOUT = 200


def build(n_train: int = N_TRAIN, n_heldout: int = N_HELDOUT, seed: int = SEED) -> dict[str, str]:
    """File name -> its text."""
    train, heldout = make_splits(n_train, n_heldout, seed)
    return {TRAIN_PATH.name: to_jsonl(train), HELDOUT_PATH.name: to_jsonl(heldout)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=N_TRAIN, help="train problems")
    parser.add_argument("--heldout", type=int, default=N_HELDOUT, help="held-out problems")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out-dir", type=Path, default=TRAIN_PATH.parent)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in build(args.train, args.heldout, args.seed).items():
        path = args.out_dir / name
        path.write_bytes(text.encode("utf-8"))
        print(f"wrote {path} ({text.count(chr(10))} problems, {len(text)} bytes)")


if __name__ == "__main__":
    main()
