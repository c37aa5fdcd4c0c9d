"""The build: the CPU extension is always there, the CUDA one whenever it can be built, and what
a user installs carries no host-specific flags."""

from __future__ import annotations

import os
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


def _setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("qstar_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines the helpers; setup() only runs as __main__
    return mod


def test_build_knobs(monkeypatch):
    """QSTAR_CUDA_ARCHS sets the arch list (default 8.0;9.0 without a GPU), QSTAR_SKIP_CUDA_BUILD
    drops the CUDA extension, and the CPU extension is always there with C++20 and OpenMP."""
    mod = _setup_module()
    monkeypatch.setenv("QSTAR_CUDA_ARCHS", "9.0a")
    assert mod._cuda_arch_list() == "9.0a"
    monkeypatch.delenv("QSTAR_CUDA_ARCHS")
    if not torch.cuda.is_available():
        assert mod._cuda_arch_list() == "8.0;9.0"
    monkeypatch.setenv("QSTAR_SKIP_CUDA_BUILD", "1")
    exts = mod._extensions()
    assert [e.name for e in exts] == ["qstar_kernels._C"]
    flags = exts[0].extra_compile_args["cxx"]
    assert "-std=c++20" in flags and "-fopenmp" in flags
    assert not any(f.startswith("-march") or f.startswith("-mtune") for f in flags)
    assert sorted(exts[0].sources) == sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cpu").glob("*.cpp")
    )
    if _cuda_build_expected():
        monkeypatch.delenv("QSTAR_SKIP_CUDA_BUILD")
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)  # restored after the test
        monkeypatch.setenv("CUDA_HOME", mod._resolve_cuda_home() or "")
        exts = mod._extensions()
        assert [e.name for e in exts] == ["qstar_kernels._C", "qstar_kernels._C_cuda"]
        nvcc = exts[1].extra_compile_args["nvcc"]
        assert "-Werror=all-warnings" in nvcc and not any(f.startswith("-march") for f in nvcc)
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0" or torch.cuda.is_available()
        assert Path(mod._resolve_cuda_home(), "bin", "nvcc").exists()


def test_sdist_carries_every_compiled_source_and_header(tmp_path):
    """An sdist (what PyPI would ship) must carry every source and header the build compiles."""
    import subprocess
    import sys
    import tarfile

    env = dict(os.environ, QSTAR_SKIP_CUDA_BUILD="1")
    # Through the PEP 517 backend, as `python -m build --sdist` and pip do.
    code = f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})"
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {
        str(p.relative_to(ROOT)) for ext in ("*.h", "*.cpp", "*.cu") for p in (ROOT / "csrc").rglob(ext)
    }
    assert wanted and wanted <= names, sorted(wanted - names)
