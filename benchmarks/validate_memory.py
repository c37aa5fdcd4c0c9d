"""Does the CPU peak-memory method of ``_common.peak_extra_memory`` see what it claims to see?

    python benchmarks/validate_memory.py            # ATen checks (seconds)
    python benchmarks/validate_memory.py --ext      # also build a tiny C++ extension (~30-60 s)

Checks that the profiler-based measurement sees:
  * allocations made by ATen ops (torch.empty, matmul, cat), with frees lowering the level;
  * autograd: saved activations and gradients of a small MLP's forward+backward;
  * (--ext) ``at::empty`` called inside a C++ extension, including a temporary that the extension
    frees before returning (peak > size of what it returns), and a ``std::vector`` buffer, which is
    expected to be INVISIBLE (it does not go through c10's allocator).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
from _common import cpu_memory_selfcheck, peak_extra_memory

MIB = 1 << 20

_EXT_SRC = r"""
#include <torch/extension.h>
#include <vector>

// Returns a (n,) float tensor; allocates and frees a temporary of 2n floats on the way.
torch::Tensor alloc_with_temp(int64_t n) {
  auto out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  {
    auto tmp = at::empty({2 * n}, at::TensorOptions().dtype(at::kFloat));
    tmp.fill_(1.0f);
    out.copy_(tmp.narrow(0, 0, n));
  }
  return out;
}

// Fills a std::vector of n floats (not through c10's allocator) and returns a 1-element tensor.
torch::Tensor vector_buffer(int64_t n) {
  std::vector<float> buf(n, 1.0f);
  auto out = at::empty({1}, at::TensorOptions().dtype(at::kFloat));
  out.fill_(buf[n - 1]);
  return out;
}
"""


def _check(name, got, lo, hi):
    ok = lo <= got <= hi
    print(
        f"  {'PASS' if ok else 'FAIL'} {name}: measured {got / MIB:.3f} MiB, "
        f"expected [{lo / MIB:.3f}, {hi / MIB:.3f}]"
    )
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ext", action="store_true", help="also build and check a tiny C++ extension")
    args = ap.parse_args()
    ok_all = True

    ok, msg = cpu_memory_selfcheck()
    print(msg)
    ok_all &= ok

    # Autograd: y = relu(x @ w1) @ w2, loss = y.sum(); x (256, 1024), w1 (1024, 1024), w2 (1024, 256).
    x = torch.randn(256, 1024)
    w1 = torch.randn(1024, 1024, requires_grad=True)
    w2 = torch.randn(1024, 256, requires_grad=True)

    def mlp():
        h = torch.relu(x @ w1)  # 1 MiB; relu output saved
        y = h @ w2
        y.sum().backward()
        w1.grad = None
        w2.grad = None

    # At the peak the graph holds x@w1 (1 MiB), relu out (1 MiB, saved), y (0.25 MiB); backward adds
    # grad_y, grad_h (1 MiB), grad_w2 (1 MiB), grad_w1 (4 MiB). A lower bound is the two weight
    # grads alone (5 MiB); everything above fits in 10 MiB.
    ok_all &= _check(
        "MLP forward+backward sees grads and activations", peak_extra_memory(mlp), 5 * MIB, 10 * MIB
    )

    if args.ext:
        from torch.utils.cpp_extension import load_inline

        build_dir = tempfile.mkdtemp(prefix="memcheck_ext_")
        print(f"building the C++ check extension in {build_dir} ...", flush=True)
        ext = load_inline(
            name="bench_memcheck_ext",
            cpp_sources=_EXT_SRC,
            functions=["alloc_with_temp", "vector_buffer"],
            build_directory=build_dir,
            extra_cflags=["-O1", "-g0"],
            verbose=False,
        )
        n = 2 * MIB  # 8 MiB of float32

        def ext_call():
            out = ext.alloc_with_temp(n)
            del out

        # out (8 MiB) and tmp (16 MiB) are live together: 24 MiB.
        ok_all &= _check(
            "at::empty inside a C++ extension (out + freed temp)",
            peak_extra_memory(ext_call),
            24 * MIB,
            24 * MIB + 4096,
        )

        def vec_call():
            out = ext.vector_buffer(n)
            del out

        got = peak_extra_memory(vec_call)
        print(
            f"  INFO std::vector buffer of 8 MiB in an extension: measured {got / MIB:.3f} MiB "
            "(expected ~0: memory outside c10's allocator is invisible to this method)"
        )

    print("ALL PASS" if ok_all else "SOME CHECKS FAILED")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
