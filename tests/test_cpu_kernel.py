"""Properties of the C++ CPU attention kernel beyond equivalence: every output element and every
scratch element is written before use (NaN poisoning), all internal schedules agree, and extra
memory grows like O(L * (a + 1)), never like the dense O(L * L * (a + 1)). (Its equivalence with
the reference, with the other backends, is in tests/test_thought_attention.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close_to_reference, make_padding, make_qkv, reference64

from qstar_kernels import _ext, thought_attention

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def poison():
    ext = _ext.cpu_extension()
    assert ext is not None, _ext.cpu_extension_error()
    old = ext._set_poison_outputs(True)
    assert ext._set_poison_outputs(True) is True  # the switch took
    yield
    ext._set_poison_outputs(old)


@pytest.mark.parametrize(
    "B,Hq,Hkv,L,depth,D,pad,window",
    [
        (2, 4, 2, 37, 3, 16, "both", None),
        (1, 8, 2, 130, 2, 64, "start", 20),
        (3, 3, 3, 9, 0, 5, "random", None),
        (1, 2, 1, 1, 4, 8, None, None),
    ],
)
def test_every_element_written_under_poison(poison, B, Hq, Hkv, L, depth, D, pad, window, seed):
    q, k, v = make_qkv(B, Hq, Hkv, L, depth, D, requires_grad=True)
    keep = make_padding(B, L, pad or "none")
    out, lse = thought_attention(
        q, k, v, key_padding_mask=keep, sliding_window=window, return_lse=True, backend="cpu"
    )
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    g_lse = torch.randn_like(lse).masked_fill(torch.isneginf(lse), 0.0)
    loss = (out * torch.randn_like(out)).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * g_lse).sum()
    for g in torch.autograd.grad(loss, (q, k, v)):
        assert not torch.isnan(g).any()
    want = reference64(q, k, v, key_padding_mask=keep, sliding_window=window)
    assert_close_to_reference("out", out, want)


_SCHEDULE_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from helpers import make_qkv, make_padding, reference64
from qstar_kernels import thought_attention, _ext
_ext.cpu_extension()._set_poison_outputs(True)
torch.manual_seed(0)
worst = {torch.float64: 0.0, torch.float32: 0.0}
cases = [(2, 4, 2, 67, 3, 24, "both", None), (1, 6, 3, 40, 5, 8, "start", 7),
         (3, 2, 1, 33, 1, 16, "random", None), (1, 8, 2, 150, 4, 64, "end", 50)]
for dtype in worst:
    for (B, Hq, Hkv, L, a, D, pad, w) in cases:
        q, k, v = make_qkv(B, Hq, Hkv, L, a, D, dtype=dtype, requires_grad=True)
        keep = make_padding(B, L, pad)
        kw = dict(key_padding_mask=keep, sliding_window=w, return_lse=True)
        out, lse = thought_attention(q, k, v, backend="cpu", **kw)
        ref, rlse = reference64(q, k, v, **kw)
        g = torch.randn_like(ref)
        gl = torch.randn_like(rlse).masked_fill(torch.isneginf(rlse), 0.0)
        def loss(o, l):
            return (o.double() * g).sum() + (torch.where(torch.isfinite(l), l.double(), 0.0) * gl).sum()
        got = torch.autograd.grad(loss(out, lse), (q, k, v))
        exp = torch.autograd.grad(loss(ref, rlse), (q, k, v))
        for x, y in [(out, ref)] + list(zip(got, exp)):
            assert not torch.isnan(x).any()
            err = (x.double() - y).abs().max().item() / max(1.0, y.abs().max().item())
            worst[dtype] = max(worst[dtype], err)
print(worst[torch.float64], worst[torch.float32])
"""


@pytest.mark.parametrize(
    "env",
    [
        {"QSTAR_CPU_NO_BLAS": "1"},
        {"QSTAR_CPU_NO_AVX512": "1"},
        {"QSTAR_CPU_BLOCK_ROWS": "3", "QSTAR_CPU_KEY_CHUNK": "5"},
        {"OMP_NUM_THREADS": "1"},
        {"OMP_NUM_THREADS": "3"},
    ],
    ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()),
)
def test_internal_schedules_agree_with_reference(env):
    """The kernel's knobs (read once per process) select other code paths: no BLAS, no AVX-512,
    tiny blocks and key chunks (several chunks per row), one thread (the owner schedule), and an
    odd thread count (the shared schedule with private dK/dV buffers). Each must match, in float64
    and in float32 (where the vectorised exp and sgemm run)."""
    full_env = dict(os.environ, **env)
    res = subprocess.run(
        [sys.executable, "-c", _SCHEDULE_SCRIPT, str(ROOT / "tests")],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    worst64, worst32 = map(float, res.stdout.strip().splitlines()[-1].split())
    assert worst64 < 1e-10, f"float64: max relative error {worst64:.3e} with {env}"
    assert worst32 < 2e-5, f"float32: max relative error {worst32:.3e} with {env}"


def _peak_extra_bytes(fn) -> int:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import peak_extra_memory
    finally:
        sys.path.pop(0)
    return peak_extra_memory(fn, "cpu")


def test_extra_memory_grows_like_L_times_depth(seed):
    """fwd+bwd peak extra memory stays within a small multiple of the inputs and outputs (which are
    O(L * (a + 1)) themselves) and far below one dense (L, (a+1)L) score block per head."""
    B, Hq, Hkv, L, D = 1, 4, 1, 512, 32
    for depth in (1, 16):
        q, k, v = make_qkv(B, Hq, Hkv, L, depth, D, requires_grad=True)
        grad = torch.randn_like(q)

        def step(q=q, k=k, v=v, grad=grad):
            out = thought_attention(q, k, v, backend="cpu")
            out.backward(grad)
            for t in (q, k, v):
                t.grad = None

        step()
        peak = _peak_extra_bytes(step)
        io_bytes = 4 * (2 * q.numel() + 2 * k.numel())  # q, out, k, v
        grads = 4 * (q.numel() + 2 * k.numel())
        dense_scores = 4 * B * Hq * L * (depth + 1) * L
        scratch_allowance = 4 << 20  # per-thread tiles
        assert peak <= io_bytes + grads + scratch_allowance, (depth, peak, io_bytes, grads)
        assert peak < dense_scores / 4, (depth, peak, dense_scores)
