"""The ``"torch"`` backend: plain PyTorch that keeps the structure and runs on any device.

It never builds the ``(L, (a+1)L)`` mask and never copies key/value heads. The scores it holds
are the causal ``(L, L)`` text block and the ``(L, a)`` diagonal of the thought blocks, merged in
one softmax. Autograd provides the backward.
"""

from __future__ import annotations

import torch


def thought_attention_torch(q, k, v, *, key_padding_mask=None, scale, sliding_window=None, return_lse=False):
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    depth = k.shape[2] // L - 1
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device

    q5 = q.to(math_dtype).reshape(B, Hkv, G, L, D)  # query head h = kv head (h // G), member h % G
    k_text = k[:, :, :L].to(math_dtype)  # (B, Hkv, L, D)
    v_text = v[:, :, :L].to(math_dtype)
    k_diag = k[:, :, L:].to(math_dtype).reshape(B, Hkv, depth, L, D)  # key i of every thought block
    v_diag = v[:, :, L:].to(math_dtype).reshape(B, Hkv, depth, L, D)

    # Text block: causal (and windowed) over real keys.  (B, Hkv, G, L, L)
    s_text = torch.matmul(q5.reshape(B, Hkv, G * L, D), k_text.transpose(-1, -2)).reshape(B, Hkv, G, L, L)
    i = torch.arange(L, device=dev)
    allowed = i[None, :] <= i[:, None]
    if sliding_window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < sliding_window)
    allowed = allowed.expand(B, L, L)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    s_text = s_text.masked_fill(~allowed[:, None, None], float("-inf"))

    # Thought blocks: query i sees only key i of each block, iff token i is real.  (B, Hkv, G, L, a)
    s_diag = torch.einsum("bhgld,bhald->bhgla", q5, k_diag)
    if key_padding_mask is not None:
        s_diag = s_diag.masked_fill(~key_padding_mask[:, None, None, :, None], float("-inf"))

    scores = torch.cat([s_text, s_diag], dim=-1) * scale  # (B, Hkv, G, L, L + a)
    row_max = scores.amax(dim=-1)
    empty = torch.isneginf(row_max)  # rows that see nothing (left padding)
    row_max = torch.where(empty, torch.zeros_like(row_max), row_max).detach()
    sum_exp = torch.exp(scores - row_max[..., None]).sum(dim=-1)
    lse = torch.where(empty, float("-inf"), torch.log(torch.where(empty, 1.0, sum_exp)) + row_max)
    probs = torch.exp(scores - torch.where(empty, 0.0, lse)[..., None])
    p_text, p_diag = probs[..., :L], probs[..., L:]

    out = torch.matmul(p_text.reshape(B, Hkv, G * L, L), v_text).reshape(B, Hkv, G, L, D)
    out = out + torch.einsum("bhgla,bhald->bhgld", p_diag, v_diag)
    out = out.reshape(B, Hq, L, D).to(q.dtype)
    if return_lse:
        return out, lse.reshape(B, Hq, L)
    return out
