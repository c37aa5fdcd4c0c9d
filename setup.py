"""Build of the compiled kernels.

* Always: ``qstar_kernels._C``, the C++/OpenMP CPU kernels (``csrc/cpu``), C++20.
* When torch is a CUDA build and ``nvcc`` is found: ``qstar_kernels._C_cuda`` (``csrc/cuda``).

Environment knobs:
  QSTAR_SKIP_CUDA_BUILD=1   never build the CUDA extension
  QSTAR_CUDA_ARCHS="8.0;9.0" compute capabilities for nvcc (default: 8.0;9.0 plus the visible GPUs')
  MAX_JOBS=N                parallel compile jobs (read by torch's ninja builder)
  QSTAR_DEBUG_BUILD=1       -O0 -g for debugging the kernels

Nothing is downloaded at build time, and no host-specific flag (-march=native) is used: the CPU
kernels pick their vector width at run time through the compiler's function multi-versioning.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _log(msg: str) -> None:
    print(f"[qstar-kernels build] {msg}", file=sys.stderr, flush=True)


def _resolve_cuda_home() -> str | None:
    """CUDA_HOME, or the toolkit root found from the real nvcc binary (not a wrapper script)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and Path(home, "bin", "nvcc").exists():
            return home
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates += [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    for root in candidates:
        if (root / "bin" / "nvcc").exists() and any(
            (root / lib).exists() for lib in ("lib64/libcudart.so", "lib/libcudart.so", "targets")
        ):
            return str(root)
    return None


def _cuda_arch_list() -> str:
    """sm_80 and sm_90 always (what CI builds and checks), plus any visible GPU's capability."""
    archs = os.environ.get("QSTAR_CUDA_ARCHS")
    if archs:
        return archs
    caps = {(8, 0), (9, 0)}
    try:
        import torch

        if torch.cuda.is_available():
            caps |= {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # noqa: BLE001 - no driver is an ordinary case here
        pass
    return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))


def _nvidia_wheel_includes() -> list[str]:
    """Headers of the nvidia-* wheels (cuBLAS and friends for CUDA 13 live under nvidia/cu13)."""
    out = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cublas/include", "nvidia/cuda_runtime/include"):
            p = Path(entry, sub)
            if p.is_dir():
                out.append(str(p))
    return out


def _extensions():
    from torch.utils.cpp_extension import CppExtension

    debug = os.environ.get("QSTAR_DEBUG_BUILD") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx_flags = opt + ["-std=c++20", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    headers = sorted(str(p.relative_to(ROOT)) for ext in ("*.h", "*.cuh") for p in (ROOT / "csrc").rglob(ext))
    exts = [
        CppExtension(
            name="qstar_kernels._C",
            sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp")),
            include_dirs=[str(ROOT / "csrc")],
            depends=headers,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]

    import torch

    if os.environ.get("QSTAR_SKIP_CUDA_BUILD") == "1":
        _log("QSTAR_SKIP_CUDA_BUILD=1: building the CPU extension only")
        return exts
    if torch.version.cuda is None:
        _log("torch is a CPU build: building the CPU extension only")
        return exts
    cuda_home = _resolve_cuda_home()
    if cuda_home is None:
        _log("torch is a CUDA build but nvcc was not found: building the CPU extension only")
        return exts
    os.environ["CUDA_HOME"] = cuda_home
    archs = _cuda_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    _log(f"building the CUDA extension with nvcc from {cuda_home} for compute capabilities {archs}")

    import torch.utils.cpp_extension as cpp_ext

    cpp_ext.CUDA_HOME = cuda_home  # torch read it at import time, possibly from a wrapper
    from torch.utils.cpp_extension import CUDAExtension

    cu_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    exts.append(
        CUDAExtension(
            name="qstar_kernels._C_cuda",
            sources=cu_sources,
            include_dirs=[str(ROOT / "csrc")] + _nvidia_wheel_includes(),
            depends=headers,
            extra_compile_args={
                "cxx": opt + ["-std=c++20"],
                "nvcc": (["-O0", "-G"] if debug else ["-O3", "-Xcompiler=-g0"])
                # Our .cu files hold no torch header, so every warning in them is ours: nvcc's
                # and the host compiler's are errors. -Xptxas=-v prints the resource report
                # (registers, spills, shared memory) into the build log; tests/test_cuda_build.py
                # checks the built kernels themselves.
                + ["-std=c++20", "--expt-relaxed-constexpr", "-Xptxas=-v", "-Werror=all-warnings"]
                + ["-Xcompiler=-Wall,-Wextra,-Werror"],
            },
        )
    )
    return exts


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__
    setup(ext_modules=_extensions(), cmdclass=_cmdclass())
