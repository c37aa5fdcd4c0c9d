"""``qstar-generate`` / ``python -m qstar.generate_cli``: generate from the command line, with a
thought before every token, and print what the model thought.

    python -m qstar.generate_cli --model runs/x --prompt "Q: 17+25=" --show-thoughts --compare
    python -m qstar.generate_cli --model tiny --prompt "hello" --max-new-tokens 16

``--model`` takes what :func:`qstar.loading.load_model` takes. ``--compare`` also generates without
thoughts (the base model, the same seed); ``--json`` writes every prompt's text, tokens, thoughts
and mixing weights.
"""

from __future__ import annotations

import torch

from .generation import generate
from .loading import load_model


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(
        prog="qstar-generate",
        description="Generate text with a thought before every token (and, with --compare, without).",
    )
    p.add_argument("--model", required=True, help="a save_pretrained / checkpoint / output directory, the "
                   "authors' checkpoint directory, an HF model (zero mixing head), or 'tiny'")  # fmt: skip
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", default=None, help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--thought-temperature", type=float, default=None, help="default: eval_thought_temperature"
    )
    p.add_argument("--n-thought-tokens", type=int, default=None, help="default: the model config's")
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--no-think", action="store_true", help="the base model alone (no thoughts)")
    p.add_argument("--compare", action="store_true", help="also generate without thoughts, same seed")
    p.add_argument("--show-thoughts", action="store_true", help="print each token's thought")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    """Run the CLI; returns one record per prompt and mode (what ``--json`` writes)."""
    import json
    import sys

    args = parse_args(argv)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise SystemExit("qstar-generate: give --prompt TEXT (repeatable) or --prompt-file FILE")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(args.model, device=device, dtype=dtype, seed=args.seed)
    modes = [False] if args.no_think else ([True, False] if args.compare else [True])
    records = []
    for think in modes:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        out = generate(
            model,
            prompts,
            max_new_tokens=args.max_new_tokens,
            n_thought_tokens=args.n_thought_tokens,
            think=think,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            thought_temperature=args.thought_temperature,
            stop_strings=args.stop,
            return_thoughts=think,
            generator=gen,
        )
        label = "with thoughts" if think else "without thoughts"
        for b, prompt in enumerate(prompts):
            rec = {
                "prompt": prompt,
                "think": think,
                "text": out.texts[b],
                "finish_reason": out.finish_reasons[b],
                "tokens": out.new_tokens[b, : out.lengths[b]].tolist(),
            }
            print(f"=== [{label}] {prompt!r}\n{prompt}{out.texts[b]}")
            if think:
                rec["thoughts"] = out.thought_texts[b]
                rec["mixing_weights"] = out.mixing_weights[b, : out.lengths[b]].tolist()
                if args.show_thoughts:
                    pieces = [model.tokenizer.decode([t]) for t in rec["tokens"]]
                    for piece, thought, w in zip(pieces, rec["thoughts"], rec["mixing_weights"]):
                        print(f"  {piece!r:>12}  w={w:+.3f}  thought: {thought!r}")
            records.append(rec)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return records


def cli() -> int:
    """The ``qstar-generate`` console script."""
    import sys

    main(sys.argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
