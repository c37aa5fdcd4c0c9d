#!/usr/bin/env python
"""Does a Mistral-7B-shaped Quiet-STaR training step fit one GPU, as ``memory_model.py`` predicts?

    python benchmarks/mistral7b_gpu.py                 # on a CUDA GPU (make gpu-check runs it)
    python benchmarks/mistral7b_gpu.py --layers 4      # a smoke run of the script on a small GPU

Random weights in Mistral-7B's shape (32 layers, hidden 4096, GQA 32/8, vocabulary 32000 + 2), pure
bf16 weights and AdamW state (the authors' precision), gradient checkpointing on, the paper's
rollout (``n_thought_tokens`` 9, ``n_talk_tokens`` 4, ``n_rationales`` 2, L = 256), full
fine-tuning and LoRA r=16 on every linear layer. For each configuration: the paper's batch 8
(the model predicts 112 GB with full fine-tuning, 66 GB with LoRA; an out-of-memory error is
recorded as the outcome where it does not fit), then the largest batch (and, where no batch fits,
the largest length at batch 1) that the model says fits this GPU. Two optimizer steps each; the row
keeps ``torch.cuda.max_memory_allocated`` and the second step's time next to the prediction.
Without a CUDA GPU it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import _common  # noqa: F401  (puts the repository root on sys.path)
import torch
from memory_model import MISTRAL_7B, Step, largest, predict

from qstar import QuietStarConfig, QuietStarForCausalLM
from qstar.durable import write_atomic


def build(arch, step: Step, device):
    from transformers import MistralForCausalLM

    V = arch.vocab - 2
    cfg = arch.mistral_config()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            base = MistralForCausalLM(cfg)
            base.resize_token_embeddings(V + 2, mean_resizing=False)
            method = QuietStarConfig(
                n_thought_tokens=step.n_thought, n_talk_tokens=step.n_talk, n_rationales=step.n_rationales,
                gradient_checkpointing=step.checkpointing,
            )  # fmt: skip
            model = QuietStarForCausalLM(base, method, start_id=V, end_id=V + 1, pad_token_id=2)
    finally:
        torch.set_default_dtype(default)
    if step.lora_r:
        from qstar.lora import add_lora

        add_lora(model, r=step.lora_r, alpha=2.0 * step.lora_r)
        model.to(torch.bfloat16)
    return model.train()


def run_one(arch, step: Step, device) -> dict:
    p = predict(arch, step)
    row = {"batch": step.batch, "seq_len": step.seq_len, "lora_r": step.lora_r,
           "checkpointing": step.checkpointing, "predicted_gb": p["peak"] / 1e9}  # fmt: skip
    model = opt = None
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        model = build(arch, step, device)
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
        gen = torch.Generator(device).manual_seed(1)
        ids = torch.randint(3, arch.vocab - 2, (step.batch, step.seq_len), device=device)
        times = []
        for _ in range(2):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(ids, generator=gen).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        row.update(outcome="ran", measured_gb=torch.cuda.max_memory_allocated(device) / 1e9, step_s=times[-1])
        row["error"] = row["predicted_gb"] / row["measured_gb"] - 1
    except torch.cuda.OutOfMemoryError:
        row.update(outcome="out of memory", measured_gb=None, step_s=None)
    except RuntimeError as err:  # e.g. a cuBLAS workspace allocation: record it, keep the other rows
        row.update(outcome=f"error: {str(err).splitlines()[0][:200]}", measured_gb=None, step_s=None)
    finally:
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--layers", type=int, default=MISTRAL_7B.layers, help="fewer layers: a smoke run")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("mistral7b_gpu: skipped, no CUDA GPU is visible")
        return 0
    device = torch.device("cuda:0")
    arch = replace(MISTRAL_7B, layers=args.layers)
    capacity = torch.cuda.get_device_properties(device).total_memory / 1e9
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device)
    rows = []

    def record(row: dict) -> None:
        """Each row is written as soon as it is measured: a later failure or timeout keeps it."""
        rows.append(row)
        result = {"device": name, "capacity_gb": capacity, "arch": vars(arch), "rows": rows}
        write_atomic(out / "mistral7b_gpu.json", json.dumps(result, indent=2) + "\n")

    for r in (0, 16):
        paper = Step(batch=8, precision="bf16", checkpointing=True, lora_r=r)
        record(run_one(arch, paper, device))
        b = largest(arch, paper, capacity * 0.95, "batch")
        fitting = (
            replace(paper, batch=b)
            if b
            else replace(
                paper, batch=1, seq_len=largest(arch, replace(paper, batch=1), capacity * 0.95, "seq_len")
            )
        )
        if fitting.seq_len >= 8 and (fitting.batch, fitting.seq_len) != (8, 256):
            record(run_one(arch, fitting, device))
    print(f"wrote {out / 'mistral7b_gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
