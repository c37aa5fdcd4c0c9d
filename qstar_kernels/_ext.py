"""Loading the compiled extensions, once, with the reason kept when one is missing."""

from __future__ import annotations

import functools
import importlib


@functools.cache
def _load(name: str):
    import torch  # noqa: F401  (libc10 must be loaded before an extension module)

    try:
        return importlib.import_module(f"qstar_kernels.{name}"), None
    except ImportError as exc:  # not built, or built against another torch
        return None, f"{type(exc).__name__}: {exc}"


def cpu_extension():
    """The C++/OpenMP CPU kernels (``qstar_kernels._C``), or None."""
    return _load("_C")[0]


def cpu_extension_error() -> str | None:
    return _load("_C")[1]


def cuda_extension():
    """The CUDA kernels (``qstar_kernels._C_cuda``), or None."""
    return _load("_C_cuda")[0]


def cuda_extension_error() -> str | None:
    return _load("_C_cuda")[1]
