"""Shared helpers of the LM-head op tests (test_mixing.py, test_sampling.py, test_dispatch.py,
test_custom_ops.py)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import qstar_kernels
from qstar_kernels import _ext
from qstar_kernels.backends.lm_head import base as lm_head_base

#: The fused backends tested on the CPU; "triton" runs through the interpreter (tiny shapes only).
FUSED = ["torch", "cpu", "triton"]
LOWP = (torch.float16, torch.bfloat16)


def require(backend: str) -> None:
    """Fail (never skip) when a backend that this machine must have is missing."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.fail("the triton backend is tested under TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    if backend not in qstar_kernels.available_lm_head_backends("cpu"):
        pytest.fail(f"backend {backend!r} is not available in this build; build it before testing")


def tiles(shape):
    """A tile-shape override, or nothing for the default tiles."""
    return lm_head_base.tiling_override(*shape) if shape else contextlib.nullcontext()


@contextlib.contextmanager
def poisoned():
    """Every buffer the fused passes allocate starts as NaN (-7 for integers)."""
    ext = _ext.cpu_extension()
    old_py = lm_head_base.POISON
    lm_head_base.POISON = True
    old_c = ext.lm_head_set_poison(True)
    try:
        yield
    finally:
        lm_head_base.POISON = old_py
        ext.lm_head_set_poison(old_c)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(name, got, want64, dtype, yardstick=None, mult=2.0):
    """``got`` is finite exactly where ``want64`` is, and close to it: within an absolute-plus-
    relative float32 tolerance for float32/float64 inputs; for float16/bfloat16 within ``mult``
    times the error of the plain PyTorch computation in that dtype (``yardstick``), plus a float32
    slack (``docs/kernels.md``, "Testing rules for every kernel")."""
    assert got.shape == want64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want64.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN"
    finite = torch.isfinite(want64)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite entries differ from the reference"
    scale = max(1.0, want64[finite].abs().max().item()) if finite.any() else 1.0
    err = max_err(got[finite], want64[finite])
    if dtype == torch.float64:
        bound = 1e-10 * scale
    elif dtype in LOWP:
        assert yardstick is not None
        bound = mult * max_err(yardstick[finite], want64[finite]) + 2e-5 * scale
    else:
        bound = 2e-5 * scale
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} ({dtype})"
