"""Dense thought masks for callers that need the mask tensor itself.

The fused attention never builds these. On a CUDA device with the CUDA extension built, the bool
mask is filled by one kernel (``csrc/cuda/thought_mask.cu``); elsewhere it is the reference's
construction. Both give exactly :func:`qstar_kernels.reference.build_thought_mask`.
"""

from __future__ import annotations

import torch

from . import _ext
from .reference import attention as _ref

__all__ = ["build_thought_mask", "build_additive_thought_mask"]


def build_thought_mask(L, depth, key_padding_mask=None, sliding_window=None, device=None) -> torch.Tensor:
    """Bool mask ``(B, 1, L, (depth+1)*L)``, True where allowed (``B = 1`` without padding)."""
    _ref._check_mask_args(L, depth, key_padding_mask, sliding_window)
    if device is None:
        device = key_padding_mask.device if key_padding_mask is not None else torch.device("cpu")
    device = torch.device(device)
    ext = _ext.cuda_extension() if device.type == "cuda" else None
    if ext is None:
        return _ref.dense_thought_mask(L, depth, key_padding_mask, sliding_window, device=device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    keep = None
    B = 1
    if key_padding_mask is not None:
        keep = key_padding_mask.to(device=device, dtype=torch.bool).contiguous()
        B = keep.shape[0]
    window = -1 if sliding_window is None else int(sliding_window)
    return ext.build_thought_mask(keep, B, L, depth, window, device)


def build_additive_thought_mask(
    L, depth, key_padding_mask=None, sliding_window=None, dtype=torch.float32, device=None
) -> torch.Tensor:
    """Additive form: 0 where allowed, ``finfo(dtype).min`` where blocked (the authors' encoding)."""
    _ref._check_additive_dtype(dtype)
    allowed = build_thought_mask(L, depth, key_padding_mask, sliding_window, device=device)
    return _ref.additive_from_bool(allowed, dtype)
