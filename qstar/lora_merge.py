"""Merge a LoRA model's adapters into its base and export it: ``python -m qstar.lora_merge SRC OUT``.

SRC is anything :func:`qstar.loading.load_model` takes that holds LoRA adapters (a trainer output or
checkpoint directory, a ``save_pretrained`` directory); OUT receives a plain
``QuietStarForCausalLM.save_pretrained`` directory (every weight, no adapters) that loads without
peft.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import ArgumentParser, check_output_dir, run_cli
from .loading import load_model
from .lora import has_lora, merge_lora


def main(argv=None) -> Path:
    p = ArgumentParser(prog="qstar-lora-merge", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("source", help="a LoRA checkpoint, output or save_pretrained directory")
    p.add_argument("output", help="the directory to write the merged model to")
    args = p.parse_args(argv)
    check_output_dir("output", args.output)
    model = load_model(args.source)
    if not has_lora(model):
        raise ValueError(f"source {args.source!r}: the model has no LoRA adapters (nothing to merge)")
    merge_lora(model).save_pretrained(args.output)
    print(f"wrote the merged model to {args.output}")
    return Path(args.output)


def cli(argv: list[str] | None = None) -> int:
    return run_cli("qstar-lora-merge", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
