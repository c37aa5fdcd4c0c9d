#!/usr/bin/env python
"""An analytic model of one Quiet-STaR training step's peak memory, ours and the authors' way.

    python benchmarks/memory_model.py                         # Mistral-7B at the paper's settings
    python benchmarks/memory_model.py --config path/to/config.json --batch 4 --seq-len 512
    python benchmarks/memory_model.py --fit 80                # the largest batch / length under 80 GB

    from memory_model import Arch, Step, predict
    predict(Arch.from_hf_config(cfg), Step(batch=8, seq_len=256, precision="bf16", lora_r=16))

Every term is counted from the sizes alone (no model is built). ``N = batch * n_rationales * seq_len``
tokens go through each of the rollout's ``P = n_thought + n_talk + 2`` transformer passes
(``docs/algorithm.md``, "The parallel rollout"); ``b`` is the bytes of the weights' dtype.

* **Static**: the weights (every parameter), the gradients and AdamW's two moments (trainable
  parameters: all of them, or the LoRA adapters + the mixing head + the meta embeddings), all in the
  weights' dtype (``fp32``: 4 bytes, ``bf16``: 2, the authors' pure bf16).
* **Activations saved per pass and layer** (counted from the autograd graph of a Hugging Face
  Mistral/Llama decoder layer, ``benchmarks/results/memory_model_cpu.txt`` checks them):
  nine hidden-sized tensors (the two RMSNorms' input, normalised and scaled tensors; the rotated
  query, the attention output and its copy for ``o_proj``) and four MLP-sized ones (gate, up,
  SiLU(gate), their product). In bf16 the norms' float32 copies of their input stay float32. With
  frozen norm weights (LoRA) the normalised tensors are not saved; LoRA adds its rank-``r``
  intermediate for every adapted linear layer.
* **The KV cache**: each pass attends to the keys and values of all passes so far, concatenated
  (``qstar.cache``) and saved for the backward: ``2 * kv_dim * N * (a + 1)`` per layer at pass
  ``a``, quadratic in ``P``. The authors' way also saves transformers' ``repeat_kv`` copies (the
  key/value heads expanded to all query heads) instead, and its dense additive masks
  ``(R, 1, L, (a + 1) L)`` one per pass.
* **Outside the layers**: the final norm per pass; the mixing head per talk step; ours keeps the
  fused LM-head's tiles (``qstar_kernels/backends/lm_head/base.py``: 2048 x 16384 on a GPU) and,
  in bf16, the LM head's fp32 gradient accumulators; the authors' way its vocabulary-sized tensors:
  the log-softmax outputs of the base, intermediate and talk losses and of every thought step, and
  (when the embeddings train) the one-hot inputs of the thought and talk steps, ``N x V`` each, plus
  two more in the backward.
* **The peak** comes early in the backward: the last pass's backward reaches every layer, so every
  gradient exists while the activations of the other ``P - 1`` passes are still held:
  ``weights + moments + gradients + activations - the last pass's share + transients``.
* **Gradient checkpointing** (ours, per pass) keeps the cache blocks and each pass's input and
  output between forward and backward; the backward recomputes one pass at a time, the last (the
  largest) first, while the gradients of the earlier passes' cache blocks accumulate.

Not modelled: the CUDA caching allocator's fragmentation, the CUDA context (~0.5 GB), bf16-mixed
autocast's weight copies, torch.compile, and the FSDP/DDP buckets. Predictions are labelled
"modelled" until ``make gpu-check`` measures them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace

GIB = 1 << 30
#: the fused LM-head's tile on a GPU (rows x vocabulary ids, fp32) and how many the op holds at once.
GPU_TILE, GPU_TILES = (2048, 16384), 2
#: the GPUs of the docs table, in GB (1e9 bytes, as sold).
GPUS = (24, 40, 80, 141)


@dataclass(frozen=True)
class Arch:
    """The sizes of a decoder-only HF model (Mistral/Llama/Qwen2 shape)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int  # with the two meta tokens
    head_dim: int | None = None
    tied: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    def mistral_config(self):
        """A ``transformers.MistralConfig`` of this shape (the vocabulary without the two meta
        tokens, which the Quiet-STaR model adds): what the validation and the GPU check build."""
        from transformers import MistralConfig

        return MistralConfig(
            num_hidden_layers=self.layers, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, vocab_size=self.vocab - 2,
            sliding_window=None, max_position_embeddings=4096, attn_implementation="sdpa",
            tie_word_embeddings=False,
        )  # fmt: skip

    @classmethod
    def from_hf_config(cls, cfg, *, add_meta_tokens: bool = True) -> Arch:
        """From a transformers config object or its ``config.json`` dict."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        return cls(
            layers=get("num_hidden_layers"),
            hidden=get("hidden_size"),
            intermediate=get("intermediate_size"),
            heads=get("num_attention_heads"),
            kv_heads=get("num_key_value_heads") or get("num_attention_heads"),
            vocab=get("vocab_size") + (2 if add_meta_tokens else 0),
            head_dim=get("head_dim"),
            tied=bool(get("tie_word_embeddings", False)),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        H, I = self.hidden, self.intermediate  # noqa: E741
        return {
            "q_proj": (H, self.q_dim), "k_proj": (H, self.kv_dim), "v_proj": (H, self.kv_dim),
            "o_proj": (self.q_dim, H), "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H),
        }  # fmt: skip

    def n_params(self) -> int:
        per_layer = sum(i * o for i, o in self.linears().values()) + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + embeddings + self.hidden + self.n_head_params()

    def n_head_params(self) -> int:
        """The mixing head (Linear(2H, H), Linear(H, H), Linear(H, 1)) and the two (2, H) meta embeddings."""
        H = self.hidden
        return (2 * H * H + H) + (H * H + H) + H + 4 * H


#: Mistral-7B-v0.1 with the two meta tokens.
MISTRAL_7B = Arch(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32002)


@dataclass(frozen=True)
class Step:
    """One optimizer step's settings; the defaults are the paper's (per device)."""

    batch: int = 8  # sequences per micro-batch
    seq_len: int = 256
    n_thought: int = 9
    n_talk: int = 4
    n_rationales: int = 2
    precision: str = "bf16"  # "fp32" or "bf16" (pure bf16 weights and optimizer state)
    checkpointing: bool = False
    lora_r: int = 0  # 0: full fine-tuning
    lora_targets: tuple[str, ...] = ("all-linear",)
    way: str = "ours"  # "ours" or "authors"
    device: str = "cuda"  # "cuda" counts the LM-head tiles; "cpu" (the validation) does not

    @property
    def passes(self) -> int:
        return self.n_thought + self.n_talk + 2

    @property
    def tokens(self) -> int:
        return self.batch * self.n_rationales * self.seq_len

    def check(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.way not in ("ours", "authors"):
            raise ValueError(f"way must be 'ours' or 'authors', got {self.way!r}")
        if self.way == "authors" and self.checkpointing:
            raise ValueError("the authors' way is modelled without gradient checkpointing")


def _targets(arch: Arch, step: Step) -> list[tuple[int, int]]:
    names = list(arch.linears()) if "all-linear" in step.lora_targets else list(step.lora_targets)
    return [arch.linears()[n] for n in names]


def trainable_params(arch: Arch, step: Step) -> int:
    if not step.lora_r:
        return arch.n_params()
    adapters = arch.layers * sum(step.lora_r * (i + o) for i, o in _targets(arch, step))
    return adapters + arch.n_head_params()


def _layer_pass_bytes(arch: Arch, step: Step) -> float:
    """Saved bytes of one decoder layer for one pass, per token (the KV cache apart)."""
    H, I = arch.hidden, arch.intermediate  # noqa: E741
    b = 4 if step.precision == "fp32" else 2
    if step.precision == "fp32":
        hidden_bytes = (7 if step.lora_r else 9) * 4 * H
    else:  # two float32 copies in the norms; the rest bf16
        hidden_bytes = 2 * 4 * H + (5 if step.lora_r else 7) * 2 * H
    lora = sum(step.lora_r for _ in _targets(arch, step)) * b if step.lora_r else 0
    return hidden_bytes + 4 * I * b + lora


def predict(arch: Arch, step: Step) -> dict:
    """The terms (bytes) and the peak of one training step; see the module doc."""
    step.check()
    b = 4 if step.precision == "fp32" else 2
    N, P, L = step.tokens, step.passes, step.seq_len
    H, V = arch.hidden, arch.vocab
    weights = (
        arch.n_params() + (trainable_params(arch, step) - arch.n_head_params() if step.lora_r else 0)
    ) * b
    grads = trainable_params(arch, step) * b
    moments = 2 * grads

    layer = arch.layers * N * _layer_pass_bytes(arch, step)  # one pass, all layers
    kv_width = arch.q_dim if step.way == "authors" else arch.kv_dim  # repeat_kv copies / our concatenation
    kv = [arch.layers * 2 * kv_width * N * (a + 1) * b for a in range(P)]
    masks = [N * L * (a + 1) * b for a in range(P)] if step.way == "authors" else [0] * P
    norm = (
        N * (4 * H if step.precision == "bf16" or step.lora_r else 0) + N * (2 if step.lora_r else 3) * H * b
    )
    outside = P * norm + step.n_talk * N * 6 * H * b  # final norm per pass, mixing head per talk step
    n, K = step.n_thought, step.n_talk
    if step.way == "authors":
        # log-softmax outputs: the base, intermediate (n + 1) and talk (K) losses, the n thought steps;
        # the one-hot step inputs (n thoughts, K - 1 talk tokens) only when the embeddings train.
        vocab_saved = ((n + K + 2) + n + (0 if step.lora_r else n + K - 1)) * N * V * b
        transient = 2 * N * V * b
    else:
        vocab_saved = 0
        transient = GPU_TILES * GPU_TILE[0] * GPU_TILE[1] * 4 if step.device == "cuda" else 0
        if not step.lora_r:  # the LM head's gradient: the second op's adds to the first's (fp32
            transient += V * H * 4 * (2 if step.precision == "bf16" else 1)  # accumulators in bf16)
    per_pass = [layer + kv[a] + masks[a] for a in range(P)]
    activations = sum(per_pass) + outside + vocab_saved
    if step.checkpointing:
        # Between forward and backward: the cache blocks and each pass's input and output. The
        # backward recomputes one pass at a time (the last is the largest) while the gradients of
        # the earlier passes' cache blocks accumulate.
        blocks = arch.layers * 2 * arch.kv_dim * N * b
        kept = blocks * P + 2 * N * H * b * P
        talk_heads = outside - P * norm  # the final norm runs inside the checkpointed pass
        held = kept + talk_heads + per_pass[-1] + blocks * (P - 1)
    else:
        held = activations - per_pass[-1]
    peak = weights + moments + grads + held + transient
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer": moments,
        "activations": activations,
        "kv_cache": sum(kv),
        "masks": sum(masks),
        "vocab_tensors": vocab_saved,
        "lm_head_tiles": transient if step.way == "ours" else 0,
        "held_at_peak": held,
        "transient": transient,
        "peak": peak,
        "trainable_params": trainable_params(arch, step),
        "params": arch.n_params(),
    }


def largest(arch: Arch, step: Step, budget_gb: float, field: str) -> int:
    """The largest ``field`` (``batch`` or ``seq_len``) whose modelled peak fits ``budget_gb`` (0: none)."""
    lo, hi = 0, 1
    while predict(arch, replace(step, **{field: hi}))["peak"] <= budget_gb * 1e9 and hi < 1 << 20:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (
            (mid, hi)
            if predict(arch, replace(step, **{field: mid}))["peak"] <= budget_gb * 1e9
            else (lo, mid)
        )
    return lo


CONFIGURATIONS = [  # (label, way, lora_r, checkpointing)
    ("full fine-tuning", "ours", 0, False),
    ("full fine-tuning + checkpointing", "ours", 0, True),
    ("LoRA r=16", "ours", 16, False),
    ("LoRA r=16 + checkpointing", "ours", 16, True),
    ("full fine-tuning", "authors", 0, False),
    ("LoRA r=16", "authors", 16, False),
]


def table(arch: Arch, base: Step) -> str:
    """The docs table: peak per configuration and which GPUs it fits (modelled)."""
    head = ("| way | configuration | weights+grads+AdamW | activations held | peak | fits (GB) "
            "| max batch, 80 GB | max L at batch 1, 80 GB |")  # fmt: skip
    lines = [head, "|" + "---|" * 8]
    for label, way, r, ckpt in CONFIGURATIONS:
        step = replace(base, way=way, lora_r=r, checkpointing=ckpt)
        p = predict(arch, step)
        fits = ", ".join(f"{g}" for g in GPUS if p["peak"] <= g * 1e9) or "none"
        static = p["weights"] + p["gradients"] + p["optimizer"]
        lines.append(
            f"| {way} | {label} | {static / 1e9:.1f} GB | {p['held_at_peak'] / 1e9:.1f} GB | "
            f"**{p['peak'] / 1e9:.1f} GB** | {fits} | {largest(arch, step, 80, 'batch')} | "
            f"{largest(arch, replace(step, batch=1), 80, 'seq_len')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="an HF config.json (default: Mistral-7B)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--n-thought", type=int, default=9)
    ap.add_argument("--n-talk", type=int, default=4)
    ap.add_argument("--n-rationales", type=int, default=2)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--lora-r", type=int, default=0)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--way", default="ours", choices=["ours", "authors"])
    ap.add_argument("--fit", type=float, default=None, help="GB: print the largest batch and length that fit")
    ap.add_argument("--table", action="store_true", help="the docs table (all configurations)")
    args = ap.parse_args(argv)
    for flag in ("batch", "seq_len", "n_thought", "n_talk", "n_rationales", "lora_r"):
        value, low = getattr(args, flag), 0 if flag in ("n_thought", "lora_r") else 1
        if value < low:
            ap.error(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    if args.fit is not None and not args.fit > 0:
        ap.error(f"--fit must be a number of GB > 0, got {args.fit}")
    if args.config:
        try:
            with open(args.config) as f:
                arch = Arch.from_hf_config(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as err:
            ap.error(f"--config {args.config!r}: not a readable HF config.json ({type(err).__name__}: {err})")
    else:
        arch = MISTRAL_7B
    step = Step(
        batch=args.batch, seq_len=args.seq_len, n_thought=args.n_thought, n_talk=args.n_talk,
        n_rationales=args.n_rationales, precision=args.precision, lora_r=args.lora_r,
        checkpointing=args.checkpointing, way=args.way,
    )  # fmt: skip
    if args.table:
        print(table(arch, step))
        return 0
    p = predict(arch, step)
    for k, v in p.items():
        print(f"{k:>18}: {v / 1e9:10.2f} GB" if "params" not in k else f"{k:>18}: {v:,}")
    if args.fit:
        print(f"largest batch at L={step.seq_len}: {largest(arch, step, args.fit, 'batch')}")
        print(f"largest L at batch {step.batch}: {largest(arch, step, args.fit, 'seq_len')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
