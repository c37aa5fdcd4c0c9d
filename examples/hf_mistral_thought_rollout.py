#!/usr/bin/env python
"""A Quiet-STaR rollout on a Hugging Face Mistral, patched in one call (runs in seconds on a CPU).

A tiny random-initialised Mistral stands in for Mistral-7B. Step 0 reads the text; every later step
feeds one new token per text position (here: random "thought" tokens), with position ids ``j + a``
and a ``DynamicCache`` that grows by ``L`` keys per step. The same rollout is run twice:

* the patched model, each step inside ``thought_step(...)``: no mask is built, attention is
  ``qstar_kernels.thought_attention``;
* the unpatched model, driven the authors' way with the dense ``(B, 1, L, (a+1)L)`` mask.

Then it prints the largest relative difference of the logits (fp32 rounding) and the gradient of
one weight after a backward through the whole rollout.

    python examples/hf_mistral_thought_rollout.py
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

from qstar_kernels import build_additive_thought_mask
from qstar_kernels.hf import apply_qstar_kernels_to_mistral, cache_keyword, revert_qstar_kernels, thought_step

B, L, STEPS, VOCAB = 2, 32, 6, 256

torch.manual_seed(0)
config = MistralConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, like Mistral-7B's 32/8
    sliding_window=None,
    attn_implementation="sdpa",
)
original = MistralForCausalLM(config)
model = apply_qstar_kernels_to_mistral(copy.deepcopy(original))  # <- the one call

text = torch.randint(0, VOCAB, (B, L))
keep = torch.ones(B, L, dtype=torch.bool)  # the text's padding mask: row 1 is right-padded
keep[1, -5:] = False
thoughts = [torch.randint(0, VOCAB, (B, L)) for _ in range(STEPS - 1)]  # one token per position and step
positions = torch.arange(L).unsqueeze(0)  # (1, L); step a uses j + a


def patched_rollout():
    cache = DynamicCache()
    logits = []
    for a, tokens in enumerate([text, *thoughts]):
        with thought_step(key_padding_mask=keep, step=a):
            out = model(
                input_ids=tokens, position_ids=positions + a, **{cache_keyword(model): cache}, use_cache=True
            )
        logits.append(out.logits)  # (B, L, V)
    return torch.stack(logits)


def dense_mask_rollout():
    cache = DynamicCache()
    logits = []
    for a, tokens in enumerate([text, *thoughts]):
        mask = build_additive_thought_mask(L, a, keep, dtype=torch.float32)  # (B, 1, L, (a+1)L)
        out = original(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions + a,
            **{cache_keyword(original): cache},
            use_cache=True,
        )
        logits.append(out.logits)
    return torch.stack(logits)


fused, dense = patched_rollout(), dense_mask_rollout()
fused.sum().backward()
dense.sum().backward()

diff = (fused - dense).abs().max().item() / dense.abs().max().item()
w_fused = model.model.layers[0].self_attn.k_proj.weight.grad
w_dense = original.model.layers[0].self_attn.k_proj.weight.grad
grad_diff = (w_fused - w_dense).abs().max().item() / w_dense.abs().max().item()
print(f"{STEPS} steps, B={B}, L={L}: logits {tuple(fused.shape[1:])} per step")
print(
    f"max relative difference, patched vs dense mask: logits {diff:.2e}, layer-0 k_proj grad {grad_diff:.2e}"
)
revert_qstar_kernels()
if not (diff < 1e-5 and grad_diff < 1e-5):
    raise SystemExit("MISMATCH")
print("OK")
