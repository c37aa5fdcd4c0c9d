"""The ``"torch"`` backend of ``thought_attention``: plain PyTorch that keeps the structure and runs
on any device.

It never builds the ``(L, (a+1)L)`` mask and never copies key/value heads. The scores it holds
are the causal ``(L, L)`` text block and the ``(L, a)`` diagonal of the thought blocks, merged in
one softmax. Autograd provides the backward.
"""

from __future__ import annotations

import torch


def forward(q, k, v, keep, scale: float, window: int, return_lse: bool = False):
    """``out`` ``(B, Hq, L, D)`` in q.dtype, or ``(out, lse)``; ``window <= 0`` means none."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    depth = k.shape[2] // L - 1
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device

    # Scale once on the small side: (B, Hkv, G, L, D); query head h = kv head h // G, member h % G.
    q5 = (q.to(math_dtype) * scale).reshape(B, Hkv, G, L, D)
    k_text = k[:, :, :L].to(math_dtype)  # (B, Hkv, L, D)
    v_text = v[:, :, :L].to(math_dtype)
    k_diag = k[:, :, L:].to(math_dtype).reshape(B, Hkv, depth, L, D)  # key i of every thought block
    v_diag = v[:, :, L:].to(math_dtype).reshape(B, Hkv, depth, L, D)

    # Text block: causal (and windowed) over real keys.  (B, Hkv, G, L, L)
    s_text = torch.matmul(q5.reshape(B, Hkv, G * L, D), k_text.transpose(-1, -2)).reshape(B, Hkv, G, L, L)
    i = torch.arange(L, device=dev)
    allowed = i[None, :] <= i[:, None]
    if window > 0:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    allowed = allowed.expand(B, L, L)
    if keep is not None:
        allowed = allowed & keep[:, None, :]
    s_text = s_text.masked_fill(~allowed[:, None, None], float("-inf"))

    # Thought blocks: query i sees only key i of each block, iff token i is real.  (B, Hkv, G, L, a)
    # Per (b, kv head, i): the G query rows (G, D) times that position's a keys (D, a); batched
    # matmuls over (b, h, i), so no key/value is repeated per query head.
    q_by_pos = q5.permute(0, 1, 3, 2, 4)  # (B, Hkv, L, G, D)
    s_diag = torch.matmul(q_by_pos, k_diag.permute(0, 1, 3, 4, 2)).permute(0, 1, 3, 2, 4)
    if keep is not None:
        s_diag = s_diag.masked_fill(~keep[:, None, None, :, None], float("-inf"))

    # Rows that may attend to nothing (left padding) get finite dummy scores, then exact zeros:
    # no NaN in either pass.  (B, 1, 1, L, 1)
    sees_something = allowed.any(dim=-1)
    if depth > 0:
        sees_something = sees_something | (keep if keep is not None else torch.ones_like(sees_something))
    empty = ~sees_something[:, None, None, :, None]
    scores = torch.cat([s_text, s_diag], dim=-1).masked_fill(empty, 0.0)  # (B, Hkv, G, L, L + a)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    p_text, p_diag = probs[..., :L], probs[..., L:]

    out = torch.matmul(p_text.reshape(B, Hkv, G * L, L), v_text).reshape(B, Hkv, G, L, D)
    if depth > 0:
        diag_out = torch.matmul(p_diag.permute(0, 1, 3, 2, 4), v_diag.permute(0, 1, 3, 2, 4))
        out = out + diag_out.permute(0, 1, 3, 2, 4)  # (B, Hkv, L, G, D) -> (B, Hkv, G, L, D)
    out = out.reshape(B, Hq, L, D).to(q.dtype)
    if return_lse:
        lse = torch.logsumexp(scores, dim=-1, keepdim=True).masked_fill(empty, float("-inf"))
        return out, lse.reshape(B, Hq, L)
    return out
