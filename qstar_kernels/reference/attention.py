"""Thought attention, the executable specification.

This module is deliberately plain: it builds the dense mask the way the authors' Quiet-STaR code
grows it (``docs/algorithm.md``, "The thought mask"), expands the key/value heads, and runs a masked softmax.
It is slow by design and is never optimised; every other backend is tested against it.

The pattern, for step ``a`` (keys are ``a + 1`` blocks of ``L``: the text block, then one block per
thought/talk step)::

    query i may see text key j        iff  j <= i  and keep[j]  (and i - j < window, if given)
    query i may see key i of block s  iff  keep[i]                (s = 1 .. a; no other key there)
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "thought_mask_mod",
    "build_thought_mask",
    "build_additive_thought_mask",
    "thought_attention_reference",
]


def thought_mask_mod(q_idx, kv_idx, L: int, keep_q=None, keep_kv=None, sliding_window=None):
    """The mask as a pure function of a query index and a key index (FlexAttention style).

    ``q_idx`` and ``kv_idx`` may be ints or integer tensors that broadcast. ``keep_q``/``keep_kv``
    are ``keep[b, q_idx]`` / ``keep[b, kv_idx % L]`` when there is padding (else ``None``).
    """
    block = kv_idx // L  # 0 = text block, s >= 1 = the block of thought step s
    pos = kv_idx % L  # the text position that produced this key
    text = (block == 0) & (pos <= q_idx)
    if sliding_window is not None:
        text = text & (q_idx - pos < sliding_window)
    own_stream = (block > 0) & (pos == q_idx)
    if keep_kv is not None:
        text = text & keep_kv
    if keep_q is not None:
        own_stream = own_stream & keep_q
    return text | own_stream


def _check_mask_args(L, depth, key_padding_mask, sliding_window):
    if not isinstance(L, int) or L < 1:
        raise ValueError(f"L must be a positive int, got {L!r}")
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth (the number of thought blocks a) must be an int >= 0, got {depth!r}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    if key_padding_mask is not None:
        if key_padding_mask.dim() != 2 or key_padding_mask.shape[1] != L:
            raise ValueError(
                f"key_padding_mask must have shape (B, L={L}), got {tuple(key_padding_mask.shape)}"
            )


def build_thought_mask(
    L: int,
    depth: int,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device=None,
) -> torch.Tensor:
    """The dense boolean mask ``(B, 1, L, (depth + 1) * L)``, True where attention is allowed.

    Built exactly as the authors' code grows it: the causal-and-not-padding text block ``C``, then
    ``depth`` copies of ``diag(keep)`` concatenated on the key axis. ``B`` is 1 without padding.
    """
    _check_mask_args(L, depth, key_padding_mask, sliding_window)
    return dense_thought_mask(L, depth, key_padding_mask, sliding_window, device)


def dense_thought_mask(L: int, depth: int, keep, sliding_window, device=None) -> torch.Tensor:
    """:func:`build_thought_mask` for arguments already checked."""
    if device is None:
        device = keep.device if keep is not None else "cpu"
    if keep is None:
        keep = torch.ones(1, L, dtype=torch.bool, device=device)
    else:
        keep = keep.to(device=device, dtype=torch.bool)
    i = torch.arange(L, device=device)
    causal = i[None, :] <= i[:, None]  # (L, L): key j <= query i
    if sliding_window is not None:
        causal = causal & (i[:, None] - i[None, :] < sliding_window)
    text_block = causal[None] & keep[:, None, :]  # (B, L, L): key j must be a real token
    # The authors take the diagonal of the text block (query i sees itself iff keep[i]) and repeat it.
    diag = torch.diagonal(text_block, dim1=1, dim2=2)  # (B, L) == keep
    diag_block = torch.diag_embed(diag)  # (B, L, L)
    mask = torch.cat([text_block] + [diag_block] * depth, dim=-1)  # (B, L, (depth+1)L)
    return mask[:, None]  # (B, 1, L, (depth+1)L)


def build_additive_thought_mask(
    L: int,
    depth: int,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """The additive float form of :func:`build_thought_mask`: 0 where allowed, ``finfo(dtype).min``
    where blocked, as the authors pass it to SDPA or eager attention."""
    _check_additive_dtype(dtype)
    return additive_from_bool(
        build_thought_mask(L, depth, key_padding_mask, sliding_window, device=device), dtype
    )


def _check_additive_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype for an additive mask, got {dtype}")


def additive_from_bool(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Encode a bool mask the authors' way: 0 where allowed, ``finfo(dtype).min`` where blocked."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, blocked)


def thought_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    return_lse: bool = False,
):
    """Dense thought attention: mask, ``repeat_kv``, masked softmax. Differentiable by autograd.

    Math runs in float64 for float64 inputs and in float32 otherwise; the output has ``q.dtype``
    and the optional ``lse`` is float32 (float64 for float64 inputs). Rows that may attend to
    nothing give zeros and ``lse = -inf``.
    """
    L = q.shape[2]
    _check_mask_args(L, k.shape[2] // L - 1, key_padding_mask, sliding_window)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return dense_thought_attention(q, k, v, key_padding_mask, scale, sliding_window, return_lse)


def dense_thought_attention(q, k, v, keep, scale: float, sliding_window, return_lse: bool):
    """:func:`thought_attention_reference` for arguments already checked (the public op checks
    them once)."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    depth = k.shape[2] // L - 1
    group = Hq // Hkv
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    allowed = dense_thought_mask(L, depth, keep, sliding_window, device=q.device)
    qf = q.to(math_dtype)
    kf = k.to(math_dtype).repeat_interleave(group, dim=1)  # repeat_kv: (B, Hq, (a+1)L, D)
    vf = v.to(math_dtype).repeat_interleave(group, dim=1)

    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, Hq, L, (a+1)L)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A row that may attend to nothing (left padding) has every score at -inf. The `where`s keep
    # its softmax at exactly 0 and its lse at -inf without a NaN in either pass.
    row_max = scores.amax(dim=-1)  # (B, Hq, L)
    empty = torch.isneginf(row_max)
    row_max = torch.where(empty, torch.zeros_like(row_max), row_max).detach()
    sum_exp = torch.exp(scores - row_max[..., None]).sum(dim=-1)
    lse = torch.where(empty, float("-inf"), torch.log(torch.where(empty, 1.0, sum_exp)) + row_max)
    probs = torch.exp(scores - torch.where(empty, 0.0, lse)[..., None])
    out = torch.matmul(probs, vf).to(q.dtype)  # (B, Hq, L, D); empty rows are exactly 0
    if return_lse:
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return out, lse.to(lse_dtype)
    return out
