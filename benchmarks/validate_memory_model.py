#!/usr/bin/env python
"""Check ``memory_model.py`` against measured peaks on this CPU: ours (with and without gradient
checkpointing) and the authors' way (``qstar.reference``), full fine-tuning and LoRA, fp32 and bf16,
at several model sizes and rollout settings.

    python benchmarks/validate_memory_model.py            # the committed table (several minutes)
    python benchmarks/validate_memory_model.py --quick    # three rows

Measured peak = the weights + AdamW's state (after a real ``optimizer.step()``; both counted from
the tensors) + the peak bytes allocated above that level during one forward + backward
(``_common.peak_extra_memory``: the profiler's allocation records, so it is independent of the other
processes on the machine). The claim: every prediction within 15% of the measured peak. The part of
the peak that the step itself allocates (gradients + activations) is also compared, as the harder
test. Random weights, thoughts sampled, one sequence of right padding as in ``train_step.py``.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch
from _common import peak_extra_memory
from _models import PAD, authors_beside
from _report import Run, add_run_args, claim, parser
from memory_model import Arch, Step, predict
from transformers import MistralForCausalLM

from qstar import QuietStarConfig, QuietStarForCausalLM

MIB = 1 << 20
BOUND = 0.15
SIZES = {  # name -> Arch (vocab with the meta tokens)
    "2L-h128": Arch(layers=2, hidden=128, intermediate=384, heads=4, kv_heads=2, vocab=8002),
    "4L-h256": Arch(layers=4, hidden=256, intermediate=896, heads=8, kv_heads=2, vocab=32002),
    "3L-h384": Arch(layers=3, hidden=384, intermediate=1024, heads=6, kv_heads=2, vocab=16002),
}
SETTINGS = {  # name -> (batch, seq_len, n_thought, n_talk, n_rationales)
    "B1 L64 n3 K2": (1, 64, 3, 2, 2),
    "B1 L128 n9 K4": (1, 128, 9, 4, 2),
    "B2 L96 n5 K3": (2, 96, 5, 3, 2),
}
# (size, setting, precision, lora_r) measured for ours, ours + checkpointing and the authors' way
POINTS = [
    ("2L-h128", "B1 L64 n3 K2", "fp32", 0),
    ("2L-h128", "B1 L128 n9 K4", "fp32", 0),
    ("4L-h256", "B1 L64 n3 K2", "fp32", 0),
    ("4L-h256", "B1 L128 n9 K4", "fp32", 0),
    ("4L-h256", "B2 L96 n5 K3", "fp32", 0),
    ("3L-h384", "B2 L96 n5 K3", "fp32", 0),
    ("4L-h256", "B1 L128 n9 K4", "fp32", 8),
    ("3L-h384", "B2 L96 n5 K3", "fp32", 8),
    ("4L-h256", "B1 L128 n9 K4", "bf16", 0),
    ("3L-h384", "B2 L96 n5 K3", "bf16", 8),
]
QUICK = POINTS[:1] + POINTS[6:7] + POINTS[8:9]


def build(arch: Arch, step: Step, seed: int = 0):
    torch.manual_seed(seed)
    V = arch.vocab - 2
    cfg = arch.mistral_config()
    base = MistralForCausalLM(cfg)
    base.resize_token_embeddings(V + 2, mean_resizing=False)
    method = QuietStarConfig(n_thought_tokens=step.n_thought, n_talk_tokens=step.n_talk,
                             n_rationales=step.n_rationales)  # fmt: skip
    ours = QuietStarForCausalLM(base, method, start_id=V, end_id=V + 1, pad_token_id=PAD)
    ours.init_meta_embeddings(12)
    with torch.no_grad():
        ours.mixing_head[-1].weight.normal_(0, 0.02)
    if step.lora_r:
        from qstar.lora import add_lora

        add_lora(ours, r=step.lora_r, alpha=2.0 * step.lora_r, seed=seed)
    if step.precision == "bf16":
        ours = ours.to(torch.bfloat16)
    return ours


def measure(arch: Arch, step: Step, seed: int = 0) -> dict:
    """Measured bytes: weights, AdamW state, and the step's peak above them."""
    ours = build(arch, step, seed)
    model = authors_beside(ours) if step.way == "authors" else ours
    if step.way == "authors":
        del ours
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in trainable:
        p.grad = None
    weights = sum(p.numel() * p.element_size() for p in params)
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())

    g = torch.Generator().manual_seed(seed + 1)
    V = arch.vocab - 2
    ids = torch.randint(3, V, (step.batch, step.seq_len), generator=g)
    mask = torch.ones_like(ids)
    pad = step.seq_len // 8
    ids[-1, step.seq_len - pad :] = PAD
    mask[-1, step.seq_len - pad :] = 0
    gen = torch.Generator().manual_seed(seed + 2)

    def run():
        if step.way == "authors":
            sizes = dict(n_thought=step.n_thought, n_talk=step.n_talk, n_rationales=step.n_rationales)
            out = model.forward(ids, mask, **sizes, intermediate_losses=True, generator=gen)
            out["loss"].backward()
        else:
            model.config.gradient_checkpointing = step.checkpointing
            model.train()
            model(ids, mask, generator=gen).loss.backward()
        for p in params:
            p.grad = None

    extra = peak_extra_memory(run)
    return {"weights": weights, "optimizer": moments, "step_extra": extra, "peak": weights + moments + extra}


def rows_for(points) -> list[dict]:
    rows = []
    for size, setting, precision, r in points:
        arch = SIZES[size]
        batch, L, n, K, P = SETTINGS[setting]
        base = Step(batch=batch, seq_len=L, n_thought=n, n_talk=K, n_rationales=P, precision=precision,
                    lora_r=r, lora_targets=("all-linear",), device="cpu")  # fmt: skip
        for way, ckpt in (("ours", False), ("ours", True), ("authors", False)):
            step = replace(base, way=way, checkpointing=ckpt)
            got = measure(arch, step)
            p = predict(arch, step)
            step_pred = p["peak"] - p["weights"] - p["optimizer"]
            row = {
                "size": size, "setting": setting, "precision": precision, "lora_r": r,
                "way": way + ("-ckpt" if ckpt else ""),
                "measured_mib": got["peak"] / MIB, "predicted_mib": p["peak"] / MIB,
                "error": p["peak"] / got["peak"] - 1,
                "step_measured_mib": got["step_extra"] / MIB, "step_predicted_mib": step_pred / MIB,
                "step_error": step_pred / got["step_extra"] - 1,
                "static_error": (p["weights"] + p["optimizer"]) / (got["weights"] + got["optimizer"]) - 1,
            }  # fmt: skip
            print(
                f"{size:8} {setting:14} {precision} r={r:<2} {row['way']:11} measured "
                f"{row['measured_mib']:8.1f} MiB predicted {row['predicted_mib']:8.1f} "
                f"({row['error']:+.1%}); "
                f"step part {row['step_measured_mib']:7.1f} vs {row['step_predicted_mib']:7.1f} "
                f"({row['step_error']:+.1%})",
                flush=True,
            )
            rows.append(row)
    return rows


def format_table(rows) -> str:
    head = ("| size | setting | dtype | LoRA r | way | measured peak | predicted | error | step part "
            "measured | predicted | error |")  # fmt: skip
    out = [head, "|" + "---|" * 11]
    for r in rows:
        out.append(
            f"| {r['size']} | {r['setting']} | {r['precision']} | {r['lora_r']} | {r['way']} | "
            f"{r['measured_mib']:.1f} MiB | {r['predicted_mib']:.1f} MiB | {r['error']:+.1%} | "
            f"{r['step_measured_mib']:.1f} MiB | {r['step_predicted_mib']:.1f} MiB | {r['step_error']:+.1%} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="three points")
    add_run_args(ap, max_seconds=False)
    args = ap.parse_args(argv)
    args.no_plot = True  # a table, no plot
    run = Run("memory_model", __doc__, args, "cpu", default_tag="cpu_quick" if args.quick else "cpu")
    run.start()
    torch.set_num_threads(args.threads or 1)
    selfcheck = run.memory_selfcheck()
    rows = rows_for(QUICK if args.quick else POINTS)
    claims = []
    groups = (
        ("ours and the authors' way, without checkpointing", lambda r: "ckpt" not in r["way"]),
        ("ours with gradient checkpointing", lambda r: "ckpt" in r["way"]),
    )
    for label, pick in groups:
        chosen = [r for r in rows if pick(r)]
        for what, key in (("peak", "error"), ("step part (gradients + activations)", "step_error")):
            worst = max(chosen, key=lambda r: abs(r[key]))
            within = sum(abs(r[key]) <= BOUND for r in chosen)
            claims.append(claim(
                f"{label}: {what} within 15% of measured", abs(worst[key]), "<=", BOUND,
                f"{within} of {len(chosen)} rows within; worst {worst[key]:+.1%}: {worst['size']} "
                f"{worst['setting']} {worst['precision']} r={worst['lora_r']} {worst['way']}",
            ))  # fmt: skip
    return run.finish(rows, claims, report=format_table(rows), config={"bound": BOUND}, keep_text=True,
                      note=selfcheck)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
