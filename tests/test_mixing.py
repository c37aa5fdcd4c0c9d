"""``mixed_token_logprobs``: every fused backend against the dense reference, forward and backward;
gradcheck; written outputs; memory; bad input."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_head_helpers import FUSED, LOWP, assert_close, poisoned, require, tiles

from qstar_kernels import mixed_token_logprobs
from qstar_kernels.reference import mixed_token_logprobs_reference

IGNORE = -100

# The (N, V, H) grid of the issue, each with its own variant: tiles (None = the default tiles, else
# a tiny (rows, cols) override that makes every merge across tiles run), the shape of w, the base-
# pass form (h_thought=None) and non-contiguous inputs.
CASES = [
    dict(N=5, V=11, H=8, tiles=(2, 4), w_shape="N", thought=True, strided=False),
    dict(N=33, V=11, H=64, tiles=None, w_shape="N1", thought=True, strided=True),
    dict(N=5, V=3001, H=64, tiles=(4, 512), w_shape="N", thought=False, strided=False),
    dict(N=33, V=3001, H=8, tiles=(8, 1000), w_shape="N", thought=True, strided=False),
    dict(N=33, V=3001, H=64, tiles=None, w_shape="N1", thought=True, strided=False),
    dict(N=5, V=50000, H=8, tiles=None, w_shape="N", thought=True, strided=True),
    dict(N=33, V=50000, H=8, tiles=(16, 4096), w_shape="N", thought=False, strided=False),
]


def _case_id(c):
    t = "x".join(map(str, c["tiles"])) if c["tiles"] else "default"
    kind = "mixed" if c["thought"] else "base"
    return (
        f"N{c['N']}-V{c['V']}-H{c['H']}-tiles{t}-w{c['w_shape']}-{kind}{'-strided' if c['strided'] else ''}"
    )


def make_inputs(N, V, H, dtype=torch.float32, *, thought=True, w_shape="N", strided=False, ignore=True):
    """Fresh random inputs: w with values below 0 and above 1, some ignored rows, logits of a few
    units (so that the log-softmax is neither flat nor one-hot)."""
    if strided:  # the layout of views: every other feature, a transposed weight
        hb = torch.randn(N, 2 * H)[:, ::2]
        ht = torch.randn(N, 2 * H)[:, ::2]
        weight = (torch.randn(H, V) * (2.0 / math.sqrt(H))).T
    else:
        hb, ht = torch.randn(N, H), torch.randn(N, H)
        weight = torch.randn(V, H) * (2.0 / math.sqrt(H))
    w = torch.randn(N) * 1.5
    w[0], w[-1] = -1.25, 2.5  # the mixing weight is unbounded
    if w_shape == "N1":
        w = w[:, None]
    target = torch.randint(0, V, (N,))
    if ignore:
        target[1::4] = IGNORE
    hb, ht, w, weight = (t.to(dtype) for t in (hb, ht, w, weight))
    if not thought:
        ht, w = None, None
    return hb, ht, w, weight, target


def plain_lowp(hb, ht, w, weight, target):
    """The unfused PyTorch computation in the inputs' dtype: the yardstick of low precision."""
    h = hb if ht is None else (1 - w.reshape(-1, 1)) * hb + w.reshape(-1, 1) * ht
    logp = torch.log_softmax((h @ weight.T).float(), dim=-1)
    keep = target != IGNORE
    picked = logp.gather(1, torch.where(keep, target, 0)[:, None])[:, 0]
    return torch.where(keep, picked, torch.zeros_like(picked))


def _leaves(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _check_against_reference(backend, hb, ht, w, weight, target, dtype, tile_shape=None, lowp=True):
    leaves = _leaves([hb, ht, w, weight])
    with tiles(tile_shape):
        out = mixed_token_logprobs(*leaves[:3], leaves[3], target, ignore_index=IGNORE, backend=backend)
    assert out.shape == target.shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_leaves = _leaves([hb, ht, w, weight], torch.float64)
    want = mixed_token_logprobs_reference(*ref_leaves[:3], ref_leaves[3], target, ignore_index=IGNORE)
    yard = yard_leaves = None
    if dtype in LOWP and lowp:
        yard_leaves = _leaves([hb, ht, w, weight])
        yard = plain_lowp(*yard_leaves, target)
    assert_close("logp", out, want, dtype, yard)
    assert torch.all(out[target == IGNORE] == 0)

    g = torch.randn(out.shape, dtype=torch.float64).to(out.device)
    g[min(2, g.numel() - 1)] = 0.0  # a row whose gradient is skipped
    live = [i for i, t in enumerate(leaves) if t is not None]
    with tiles(tile_shape):
        grads = torch.autograd.grad((out.double() * g).sum(), [leaves[i] for i in live])
    want_grads = torch.autograd.grad((want * g).sum(), [ref_leaves[i] for i in live])
    yard_grads = [None] * len(live)
    if yard is not None:
        yard_grads = torch.autograd.grad((yard.double() * g).sum(), [yard_leaves[i] for i in live])
    names = ["grad_h_base", "grad_h_thought", "grad_w", "grad_weight"]
    for i, got, ref, y in zip(live, grads, want_grads, yard_grads):
        assert got.dtype == leaves[i].dtype and got.shape == leaves[i].shape
        assert_close(names[i], got, ref, dtype, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_reference(backend, case, dtype, seed):
    require(backend)
    hb, ht, w, weight, target = make_inputs(
        case["N"],
        case["V"],
        case["H"],
        dtype,
        thought=case["thought"],
        w_shape=case["w_shape"],
        strided=case["strided"],
    )
    _check_against_reference(backend, hb, ht, w, weight, target, dtype, case["tiles"])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_float16_and_float64(backend, seed):
    require(backend)
    for dtype in (torch.float16, torch.float64):
        _check_against_reference(backend, *make_inputs(33, 3001, 64, dtype), dtype, (8, 1000))


# The Triton kernels under the interpreter (on a GPU: the real thing): tiny shapes, fp32 and fp16.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "N,V,H,tile_shape,thought",
    [
        (5, 11, 8, (2, 4), True),
        (5, 3001, 64, None, True),
        (5, 11, 8, None, False),
        (33, 50, 8, (16, 16), True),
    ],
)
def test_triton_matches_reference(N, V, H, tile_shape, thought, dtype, seed):
    require("triton")
    hb, ht, w, weight, target = make_inputs(N, V, H, dtype, thought=thought)
    _check_against_reference("triton", hb, ht, w, weight, target, dtype, tile_shape)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_every_row_ignored(backend, seed):
    if backend != "reference":
        require(backend)
    hb, ht, w, weight, _ = make_inputs(5, 11, 8)
    target = torch.full((5,), IGNORE)
    leaves = _leaves([hb, ht, w, weight])
    out = mixed_token_logprobs(*leaves, target, ignore_index=IGNORE, backend=backend)
    assert torch.equal(out, torch.zeros(5))
    grads = torch.autograd.grad(out.sum(), leaves)
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", FUSED)
def test_custom_ignore_index_and_int32_target(backend, seed):
    require(backend)
    hb, ht, w, weight, target = make_inputs(5, 11, 8, ignore=False)
    target[3] = 7
    out = mixed_token_logprobs(hb, ht, w, weight, target.to(torch.int32), ignore_index=7, backend=backend)
    want = mixed_token_logprobs_reference(hb, ht, w, weight, target, ignore_index=7)
    assert out[3] == 0 and torch.allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradient_of_one_input_at_a_time(backend, seed):
    """Only the inputs that require grad get gradients (the passes skip the others' GEMMs)."""
    require(backend)
    hb, ht, w, weight, target = make_inputs(33, 3001, 8)
    want = _leaves([hb, ht, w, weight], torch.float64)
    ref_grads = torch.autograd.grad(mixed_token_logprobs_reference(*want, target).sum(), want)
    for k in range(4):
        args = [hb, ht, w, weight]
        args[k] = args[k].detach().requires_grad_()
        (grad,) = torch.autograd.grad(mixed_token_logprobs(*args, target, backend=backend).sum(), [args[k]])
        assert_close(f"grad of input {k}", grad, ref_grads[k], torch.float32)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_gradcheck_float64(backend, seed):
    if backend != "reference":
        require(backend)
    hb, ht, w, weight, target = make_inputs(5, 11, 6, torch.float64)
    leaves = _leaves([hb, ht, w, weight])

    def fn(hb, ht, w, weight):
        with tiles((2, 4)):
            return mixed_token_logprobs(hb, ht, w, weight, target, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_every_output_element_is_written(backend, seed):
    """With every buffer the passes allocate (tiles, tables, gradients) filled with NaN first, the
    results are still finite and right: nothing is left unwritten, nothing read before written."""
    require(backend)
    hb, ht, w, weight, target = make_inputs(33, 3001 if backend != "triton" else 50, 8)
    with poisoned():
        _check_against_reference(backend, hb, ht, w, weight, target, torch.float32, (8, 256))


@pytest.mark.parametrize("backend", FUSED)
def test_nan_input_poisons_its_row_only(backend, seed):
    require(backend)
    hb, ht, w, weight, target = make_inputs(5, 11, 8, ignore=False)
    hb[2, 3] = float("nan")
    out = mixed_token_logprobs(hb, ht, w, weight, target, backend=backend)
    want = mixed_token_logprobs_reference(hb, ht, w, weight, target)
    assert torch.isnan(out[2])
    keep = torch.arange(5) != 2
    assert torch.isfinite(out[keep]).all() and torch.allclose(out[keep], want[keep], atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_is_refused(backend, seed):
    require(backend)
    hb, ht, w, weight, target = _leaves(make_inputs(5, 11, 8)[:4]) + [make_inputs(5, 11, 8)[4]]
    out = mixed_token_logprobs(hb, ht, w, weight, target, backend=backend)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(out.sum(), [hb], create_graph=True)
    # the reference supports it
    out = mixed_token_logprobs(hb, ht, w, weight, target, backend="reference")
    (g,) = torch.autograd.grad(out.sum(), [hb], create_graph=True)
    assert g.requires_grad


def _peak_extra_bytes(fn) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from _common import peak_extra_memory
    finally:
        sys.path.pop(0)
    return peak_extra_memory(fn, "cpu")


@pytest.mark.parametrize(
    "backend,N,V,tile_shape", [("cpu", 1024, 32000, None), ("torch", 2048, 8000, (512, 1024))]
)
def test_never_holds_the_logits(backend, N, V, tile_shape, seed):
    """fwd+bwd peak extra memory: the gradients plus tiles, far below one (N, V) float32 tensor."""
    require(backend)
    H = 32
    hb, ht, w, weight, target = _leaves(make_inputs(N, V, H)[:4]) + [make_inputs(N, V, H)[4]]

    def step():
        with tiles(tile_shape):
            mixed_token_logprobs(hb, ht, w, weight, target, backend=backend).sum().backward()
        for t in (hb, ht, w, weight):
            t.grad = None

    step()
    peak = _peak_extra_bytes(step)
    logits = 4 * N * V
    grads = 4 * (weight.numel() + 2 * hb.numel() + w.numel())
    assert peak <= grads + (8 << 20), (peak, grads)
    assert peak < logits / 8, (peak, logits)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "reference", "torch", "cpu"])
class TestBadInput:
    def args(self):
        hb, ht, w, weight, target = make_inputs(5, 11, 8)
        return dict(h_base=hb, h_thought=ht, w=w, weight=weight, target=target)

    def call(self, backend, **override):
        a = self.args()
        a.update(override)
        ignore = a.pop("ignore_index", IGNORE)
        return mixed_token_logprobs(
            a["h_base"],
            a["h_thought"],
            a["w"],
            a["weight"],
            a["target"],
            ignore_index=ignore,
            backend=backend,
        )

    def test_h_base(self, backend):
        with pytest.raises(TypeError, match=r"h_base must be a torch.Tensor \(N, H\), got list"):
            self.call(backend, h_base=[[1.0]])
        with pytest.raises(ValueError, match=r"h_base must be 2-D \(N, H\), got 3-D with shape \(1, 5, 8\)"):
            self.call(backend, h_base=torch.randn(1, 5, 8))
        with pytest.raises(TypeError, match=r"h_base must have a floating dtype .*got torch.int64"):
            self.call(backend, h_base=torch.ones(5, 8, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"h_base must have H >= 1 features, got shape \(5, 0\)"):
            self.call(
                backend, h_base=torch.randn(5, 0), h_thought=torch.randn(5, 0), weight=torch.randn(11, 0)
            )

    def test_h_thought(self, backend):
        with pytest.raises(
            ValueError, match=r"h_thought must have h_base's shape \(5, 8\) \(N, H\), got \(4, 8\)"
        ):
            self.call(backend, h_thought=torch.randn(4, 8))
        with pytest.raises(
            TypeError, match=r"h_thought must have h_base's dtype torch.float32, got torch.float64"
        ):
            self.call(backend, h_thought=torch.randn(5, 8, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"h_thought must be on cpu like h_base, got meta"):
            self.call(backend, h_thought=torch.randn(5, 8, device="meta"))
        with pytest.raises(ValueError, match=r"h_thought must be 2-D \(N, H\), got 1-D"):
            self.call(backend, h_thought=torch.randn(8))

    def test_w(self, backend):
        with pytest.raises(
            ValueError, match=r"w must be a \(N,\) or \(N, 1\) tensor when h_thought is given, got None"
        ):
            self.call(backend, w=None)
        with pytest.raises(ValueError, match=r"w must be None when h_thought is None .*got a Tensor"):
            self.call(backend, h_thought=None)
        with pytest.raises(ValueError, match=r"w must have shape \(N,\) or \(N, 1\) with N=5, got \(5, 2\)"):
            self.call(backend, w=torch.randn(5, 2))
        with pytest.raises(ValueError, match=r"got \(6,\)"):
            self.call(backend, w=torch.randn(6))
        with pytest.raises(TypeError, match=r"w must have a floating dtype .*got torch.int32"):
            self.call(backend, w=torch.ones(5, dtype=torch.int32))
        with pytest.raises(
            TypeError, match=r"w must be a torch.Tensor of shape \(N,\) or \(N, 1\), got float"
        ):
            self.call(backend, w=0.5)
        with pytest.raises(ValueError, match=r"w must be on cpu like h_base, got meta"):
            self.call(backend, w=torch.randn(5, device="meta"))

    def test_weight(self, backend):
        with pytest.raises(
            ValueError, match=r"weight must have shape \(V, H\) with V >= 1 and H=8 .*got \(11, 7\)"
        ):
            self.call(backend, weight=torch.randn(11, 7))
        with pytest.raises(ValueError, match=r"got \(0, 8\)"):
            self.call(backend, weight=torch.randn(0, 8))
        with pytest.raises(ValueError, match=r"weight must be 2-D \(V, H\), got 1-D with shape \(8,\)"):
            self.call(backend, weight=torch.randn(8))
        with pytest.raises(
            TypeError, match=r"weight must have h_base's dtype torch.float32, got torch.float16"
        ):
            self.call(backend, weight=torch.randn(11, 8).half())
        with pytest.raises(ValueError, match=r"weight must be on cpu like h_base, got meta"):
            self.call(backend, weight=torch.randn(11, 8, device="meta"))

    def test_target(self, backend):
        with pytest.raises(TypeError, match=r"target must have an integer dtype .*got torch.float32"):
            self.call(backend, target=torch.zeros(5))
        with pytest.raises(ValueError, match=r"target must have shape \(N,\) with N=5 .*got \(5, 1\)"):
            self.call(backend, target=torch.zeros(5, 1, dtype=torch.long))
        with pytest.raises(
            ValueError, match=r"target values must be in \[0, V=11\) or equal ignore_index=-100, got 11"
        ):
            self.call(backend, target=torch.tensor([0, 1, 11, 2, 3]))
        with pytest.raises(ValueError, match=r"got -1"):
            self.call(backend, target=torch.tensor([0, -1, 1, 2, 3]))
        with pytest.raises(TypeError, match=r"target must be a torch.Tensor of shape \(N,\), got list"):
            self.call(backend, target=[0, 1, 2, 3, 4])
        with pytest.raises(ValueError, match=r"target must be on cpu like h_base, got meta"):
            self.call(backend, target=torch.zeros(5, dtype=torch.long, device="meta"))

    def test_ignore_index_and_backend(self, backend):
        with pytest.raises(TypeError, match=r"ignore_index must be an int, got float -100.0"):
            self.call(backend, ignore_index=-100.0)
        with pytest.raises(TypeError, match=r"ignore_index must be an int, got bool"):
            self.call(backend, ignore_index=True)
        # NumPy integers are integers like any other
        assert self.call(backend, ignore_index=np.int64(-100)).shape == (5,)


def test_bad_backend_names():
    hb, ht, w, weight, target = make_inputs(5, 11, 8)
    with pytest.raises(
        ValueError, match=r"backend must be one of \('reference', 'torch', 'cpu', 'triton', 'cuda'\).*'flash'"
    ):
        mixed_token_logprobs(hb, ht, w, weight, target, backend="flash")
    with pytest.raises(TypeError, match=r"backend must be a str or None, got int 3"):
        mixed_token_logprobs(hb, ht, w, weight, target, backend=3)


# ------------------------------------------------------------------------------------------------
# On a GPU (skipped, with the reason, where there is none; `pytest -m gpu` selects these)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("N,V,H", [(33, 3001, 64), (1000, 50000, 128)])
@pytest.mark.parametrize("backend", ["triton", "torch", "cuda"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_on_cuda_matches_reference(backend, N, V, H, dtype, seed):
    hb, ht, w, weight, target = (None if t is None else t.cuda() for t in make_inputs(N, V, H, dtype))
    tol_dtype = torch.float16 if dtype == torch.float32 else dtype
    # GPU float32 GEMMs may run in TF32: hold float32 to the float16 criterion against its own
    # plain computation, as the attention GPU tests do.
    _check_against_reference(backend, hb, ht, w, weight, target, tol_dtype)
