"""The build: the CPU extension is always there, the CUDA one whenever it can be built, and what
a user installs carries no host-specific flags."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import qstar_kernels
from qstar_kernels import _ext

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_extension_is_built_and_imports():
    assert _ext.cpu_extension() is not None, (
        f"qstar_kernels._C failed to import: {_ext.cpu_extension_error()}"
    )
    ext = _ext.cpu_extension()
    assert hasattr(ext, "thought_attention_fwd") and hasattr(ext, "thought_attention_bwd")


def _cuda_build_expected() -> bool:
    return (
        torch.version.cuda is not None
        and os.environ.get("QSTAR_SKIP_CUDA_BUILD") != "1"
        and (shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME"))
    )


def test_cuda_extension_built_when_toolkit_present():
    if not _cuda_build_expected():
        pytest.skip("no CUDA build of torch or no nvcc here, so no CUDA extension is expected")
    assert _ext.cuda_extension() is not None, f"qstar_kernels._C_cuda failed: {_ext.cuda_extension_error()}"
    assert hasattr(_ext.cuda_extension(), "build_thought_mask")


def test_no_host_specific_flags_in_the_build():
    text = (ROOT / "setup.py").read_text()
    assert not re.search(r"['\"]-march=", text)
    assert "-fopenmp" in text and "-std=c++20" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_mask_builder_matches_reference():
    from qstar_kernels.reference import build_thought_mask as ref

    keep = torch.rand(3, 37) > 0.2
    for window in (None, 5):
        got = qstar_kernels.build_thought_mask(37, 4, keep.cuda(), window)
        assert got.is_cuda
        assert torch.equal(got.cpu(), ref(37, 4, keep, window))


def test_public_mask_builder_on_cpu_is_the_reference():
    from qstar_kernels.reference import build_additive_thought_mask as ref_add

    keep = torch.rand(2, 9) > 0.3
    assert torch.equal(
        qstar_kernels.build_additive_thought_mask(9, 3, keep, 4, dtype=torch.bfloat16),
        ref_add(9, 3, keep, 4, dtype=torch.bfloat16),
    )
