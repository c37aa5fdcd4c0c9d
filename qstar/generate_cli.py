"""``qstar-generate`` / ``python -m qstar.generate_cli``: generate from the command line, with a
thought before every token, and print what the model thought.

    python -m qstar.generate_cli --model runs/x --prompt "Q: 17+25=" --show-thoughts --compare
    python -m qstar.generate_cli --model tiny --prompt "hello" --max-new-tokens 16

``--model`` takes what :func:`qstar.loading.load_model` takes. ``--compare`` also generates without
thoughts (the base model, the same seed); ``--json`` writes every prompt's text, tokens, thoughts
and mixing weights.

The arguments, the prompts and the ``--json`` path are checked before the model loads; a prompt that
holds a meta token's text (``<|startthought|>``) is refused (``docs/generation.md``). An error is one
line on stderr (``QSTAR_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cli import ArgumentParser, check_output_file, device_arg, run_cli
from .data import read_utf8
from .generation import generate
from .loading import load_model


def parse_args(argv=None):
    p = ArgumentParser(
        prog="qstar-generate",
        description="Generate text with a thought before every token (and, with --compare, without).",
    )
    p.add_argument("--model", required=True, help="a save_pretrained / checkpoint / output directory, the "
                   "authors' checkpoint directory, an HF model, a .gguf file, 'smollm2' (zero mixing head), "
                   "or 'tiny'")  # fmt: skip
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
    # Everything that can be checked without the model is checked before it loads.
    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file).expanduser()
        if not path.is_file():
            raise ValueError(f"--prompt-file {args.prompt_file!r}: no such file")
        prompts += [
            line.rstrip("\r") for line in read_utf8(path, "--prompt-file").split("\n") if line.strip()
        ]
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompt-file FILE")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.json:
        check_output_file("--json", args.json)
    device = device_arg(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(args.model, device=device, dtype=dtype, seed=args.seed)
    max_pos = getattr(model.base_model.config, "max_position_embeddings", None)
    if max_pos and args.max_new_tokens >= max_pos:
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens}: the model has {max_pos} positions "
            "(max_position_embeddings) for the prompt, the new tokens and a thought together"
        )
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


def cli(argv: list[str] | None = None) -> int:
    """The ``qstar-generate`` console script: exit status 0 on success; an error is one line on
    stderr with exit status 2 (bad input) or 1 (anything else), see :mod:`qstar.cli`."""
    return run_cli("qstar-generate", main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
