"""``sample_thought_tokens``: token-for-token equality with the reference given the same Gumbel
noise, log-probabilities and their gradients, the sampled frequencies (chi-square), greedy,
reproducibility, the noise definition itself, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lm_head_helpers import FUSED, LOWP, assert_close, poisoned, require, tiles

from qstar_kernels import BackendUnavailableError, _ext, draw_sampling_seed, sample_thought_tokens
from qstar_kernels.backends.lm_head.torch import philox_gumbel_torch
from qstar_kernels.reference import sample_thought_tokens_reference, thought_gumbel_noise
from qstar_kernels.reference.sampling import philox4x32_10

CASES = [
    dict(N=5, V=11, H=8, T=1.0, banned=[3, 7], tiles=(2, 4)),
    dict(N=33, V=11, H=64, T=0.7, banned=None, tiles=None),
    dict(N=5, V=3001, H=64, T=2.5, banned=[0, 3000], tiles=(4, 512)),
    dict(N=33, V=3001, H=8, T=1.0, banned=[5, 17, 1024], tiles=None),
    dict(N=5, V=50000, H=8, T=1.0, banned=[49999], tiles=None),
    dict(N=33, V=50000, H=8, T=0.5, banned=None, tiles=(16, 4096)),
]


def _case_id(c):
    t = "x".join(map(str, c["tiles"])) if c["tiles"] else "default"
    return f"N{c['N']}-V{c['V']}-H{c['H']}-T{c['T']}-banned{len(c['banned'] or [])}-tiles{t}"


def make_inputs(N, V, H, dtype=torch.float32):
    """Fresh random h and weight with logits of a few units."""
    h = torch.randn(N, H)
    weight = torch.randn(V, H) * (2.0 / math.sqrt(H))
    return h.to(dtype), weight.to(dtype)


def masked_logits64(h, weight, banned):
    z = h.double() @ weight.double().T
    if banned:
        z[:, banned] = float("-inf")
    return z


def logp_at(h, weight, banned, tokens, logprob_temperature=3.0):
    """The reference log-probabilities of given tokens (differentiable, in h's dtype)."""
    z = h @ weight.T
    if banned:
        z = z.index_fill(1, torch.tensor(banned, device=z.device), float("-inf"))
    return torch.log_softmax(z / logprob_temperature, dim=-1).gather(1, tokens[:, None])[:, 0]


def assert_same_tokens(got, want, keys64, tol):
    """Equal, except where the reference's best key beats the key of our token by less than tol
    (a float near-tie, which backends may break differently); such rows must be rare."""
    assert got.dtype == torch.int64 and got.shape == want.shape
    differ = (got != want).nonzero()[:, 0]
    for i in differ.tolist():
        gap = (keys64[i, want[i]] - keys64[i, got[i]]).item()
        assert 0 <= gap <= tol * max(1.0, abs(keys64[i, want[i]].item())), (i, int(got[i]), int(want[i]), gap)
    assert differ.numel() <= max(1, got.numel() // 16), f"{differ.numel()} of {got.numel()} tokens differ"


def _check(backend, case, dtype, device="cpu"):
    N, V, H, T, banned = case["N"], case["V"], case["H"], case["T"], case["banned"]
    h, weight = (t.to(device) for t in make_inputs(N, V, H, dtype))
    seed = int(torch.randint(0, 2**31, ()))
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = thought_gumbel_noise(draw_sampling_seed(gen), N, V, device=device)
    h64, w64 = (t.detach().double() for t in (h, weight))
    want_tokens, _ = sample_thought_tokens_reference(h64, w64, noise, banned_ids=banned, temperature=T)

    hl, wl = (t.detach().requires_grad_() for t in (h, weight))
    with tiles(case["tiles"]):
        tokens, logp = sample_thought_tokens(
            hl,
            wl,
            banned_ids=banned,
            temperature=T,
            generator=torch.Generator().manual_seed(seed),
            backend=backend,
        )
    keys = masked_logits64(h64, w64, banned) / T + noise.double()
    # A float32 GEMM moves a key by ~1e-6; a float16 one (the triton path) by the rounding of z.
    lowp_gemm = backend == "triton" and dtype in LOWP
    tol = (
        1e-4 if not lowp_gemm else 8 * torch.finfo(dtype).eps * keys[torch.isfinite(keys)].abs().max().item()
    )
    assert_same_tokens(tokens, want_tokens, keys, tol)
    if banned:
        assert not torch.isin(tokens, torch.tensor(banned, device=device)).any()

    # logp and its gradient, against the reference at our tokens
    r64 = [t.detach().double().requires_grad_() for t in (h, weight)]
    want = logp_at(*r64, banned, tokens)
    yard = yl = None
    if dtype in LOWP:
        yl = [t.detach().clone().requires_grad_() for t in (h, weight)]
        yard = logp_at(yl[0], yl[1], banned, tokens).float()
    assert logp.dtype == torch.float32
    assert_close("logp", logp, want, dtype, yard)
    g = torch.randn(N, dtype=torch.float64).to(device)
    g[0] = 0.0
    with tiles(case["tiles"]):
        grads = torch.autograd.grad((logp.double() * g).sum(), [hl, wl])
    want_grads = torch.autograd.grad((want * g).sum(), r64)
    yard_grads = [None, None] if yard is None else torch.autograd.grad((yard.double() * g).sum(), yl)
    for name, a, b, y in zip(("grad_h", "grad_weight"), grads, want_grads, yard_grads):
        assert a.dtype == dtype
        assert_close(name, a, b, dtype, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_reference_token_for_token(backend, case, dtype, seed):
    require(backend)
    _check(backend, case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], dict(CASES[1], N=9)], ids=_case_id)
def test_triton_matches_reference_token_for_token(case, dtype, seed):
    require("triton")
    _check("triton", case, dtype)


def test_reference_backend_draws_the_documented_noise(seed):
    h, weight = make_inputs(5, 3001, 8)
    noise = thought_gumbel_noise(draw_sampling_seed(torch.Generator().manual_seed(7)), 5, 3001)
    want, _ = sample_thought_tokens_reference(h, weight, noise, temperature=1.3)
    got, _ = sample_thought_tokens(
        h, weight, temperature=1.3, generator=torch.Generator().manual_seed(7), backend="reference"
    )
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------
# The sampled distribution
# ------------------------------------------------------------------------------------------------


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().double()
    expected = n * probs.double()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    df = torch.tensor(probs.numel() - 1, dtype=torch.float64)
    return torch.special.gammaincc(df / 2, stat / 2).item()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_frequencies_match_softmax_chi_square(backend, temperature):
    """Draws of many rows with the same logits: their frequencies fit softmax(z / T) over the
    allowed ids (chi-square, 0.1% level, fixed seed), the banned ids never come up, and the same
    counts clearly reject a 25% wrong temperature (so the test has the power to fail)."""
    if backend != "reference":
        require(backend)
    V, banned = 11, [2, 9]
    z = torch.tensor([0.3, -1.2, 2.0, 0.9, -0.4, 1.4, 0.0, -2.0, 1.1, 3.0, -0.8])
    n = 20000 if backend in ("cpu", "torch") else 4000
    h = torch.ones(n, 1)  # every row has the logits z = weight @ 1
    weight = z[:, None].clone()
    with tiles((4096, 4)):  # several vocabulary blocks: exercises the merge of the blocks' maxima
        tokens, _ = sample_thought_tokens(
            h,
            weight,
            banned_ids=banned,
            temperature=temperature,
            generator=torch.Generator().manual_seed(2024),
            backend=backend,
        )
    counts = torch.bincount(tokens, minlength=V)
    assert counts[banned].sum() == 0
    allowed = [v for v in range(V) if v not in banned]

    def probs(T):
        return torch.softmax(z[allowed].double() / T, dim=0)

    p_right = chi_square_pvalue(counts[allowed], probs(temperature))
    p_wrong = chi_square_pvalue(counts[allowed], probs(temperature * 1.25))
    assert p_right > 1e-3, f"frequencies do not fit softmax(z / {temperature}): p = {p_right:.2e}"
    assert p_wrong < 1e-3, (
        f"the test cannot tell T={temperature} from T={temperature * 1.25}: p = {p_wrong:.2e}"
    )


@pytest.mark.parametrize("backend", FUSED)
def test_banned_ids_are_never_drawn(backend, seed):
    """Even when they have by far the largest logits."""
    require(backend)
    N, V = (64, 300) if backend != "triton" else (16, 40)
    h, weight = make_inputs(N, V, 8)
    banned = list(range(0, V, 7))
    weight[banned] = h.mean(0) * 50  # huge logits for the banned ids
    with tiles((16, 32)):
        tokens, logp = sample_thought_tokens(h, weight, banned_ids=torch.tensor(banned), backend=backend)
    assert not torch.isin(tokens, torch.tensor(banned)).any()
    assert torch.isfinite(logp).all()


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_greedy_is_the_first_argmax(backend):
    """temperature=0: argmax of the masked logits, the first on ties, across vocabulary blocks."""
    if backend != "reference":
        require(backend)
    z = torch.tensor([0.5, 1.0, -1.0, 0.0, 2.0, 3.0, 1.0, 0.0, 3.0, -3.0, 1.0])  # tie: ids 5 and 8
    h, weight = torch.ones(3, 1), z[:, None].clone()
    with tiles((2, 4)):
        tokens, _ = sample_thought_tokens(h, weight, temperature=0, backend=backend)
        assert tokens.tolist() == [5, 5, 5]
        tokens, logp = sample_thought_tokens(h, weight, banned_ids=[5], temperature=0, backend=backend)
        assert tokens.tolist() == [8, 8, 8]
    want = torch.log_softmax(z.index_fill(0, torch.tensor([5]), float("-inf")).double() / 3, 0)[8]
    assert torch.allclose(logp.double(), want.expand(3), atol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_reproducible_with_a_generator(backend, seed):
    if backend != "reference":
        require(backend)
    h, weight = make_inputs(9, 301, 8)

    def draw(gen):
        return sample_thought_tokens(h, weight, generator=gen, backend=backend)

    t1, l1 = draw(torch.Generator().manual_seed(11))
    t2, l2 = draw(torch.Generator().manual_seed(11))
    t3, _ = draw(torch.Generator().manual_seed(12))
    assert torch.equal(t1, t2) and torch.equal(l1, l2)
    assert not torch.equal(t1, t3)
    torch.manual_seed(5)  # no generator: the default one, so torch.manual_seed makes it reproducible
    t4, _ = draw(None)
    torch.manual_seed(5)
    t5, _ = draw(None)
    assert torch.equal(t4, t5)
    gen = torch.Generator().manual_seed(11)  # one seed per call: the generator advances
    assert not torch.equal(draw(gen)[0], draw(gen)[0])


def test_backends_draw_the_same_tokens_from_the_same_seed(seed):
    h, weight = make_inputs(9, 3001, 16)
    out = {}
    for backend in ["reference"] + FUSED:
        if backend != "reference":
            require(backend)
        out[backend] = sample_thought_tokens(
            h, weight, generator=torch.Generator().manual_seed(99), backend=backend
        )[0]
    for backend in FUSED:
        assert torch.equal(out[backend], out["reference"]), backend


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_gradcheck_float64(backend, seed):
    if backend != "reference":
        require(backend)
    h, weight = make_inputs(5, 11, 3, torch.float64)

    def fn(h, weight):
        with tiles((3, 4)):
            _, logp = sample_thought_tokens(
                h,
                weight,
                banned_ids=[1],
                logprob_temperature=2.0,
                generator=torch.Generator().manual_seed(3),
                backend=backend,
            )
        return logp

    leaves = [t.requires_grad_() for t in (h, weight)]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_every_output_element_is_written(backend, seed):
    require(backend)
    case = dict(N=33, V=3001 if backend != "triton" else 60, H=8, T=0.9, banned=[1, 2], tiles=(8, 256))
    with poisoned():
        _check(backend, case, torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_nan_row_gives_nan_logp_and_a_valid_token(backend, seed):
    require(backend)
    h, weight = make_inputs(5, 40, 8)
    h[1, 0] = float("nan")
    tokens, logp = sample_thought_tokens(
        h, weight, generator=torch.Generator().manual_seed(1), backend=backend
    )
    assert torch.isnan(logp[1]) and torch.isfinite(logp[torch.arange(5) != 1]).all()
    assert ((tokens >= 0) & (tokens < 40)).all()


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_is_refused(backend, seed):
    require(backend)
    h, weight = (t.requires_grad_() for t in make_inputs(5, 11, 8))
    _, logp = sample_thought_tokens(h, weight, backend=backend)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(logp.sum(), [h], create_graph=True)


# ------------------------------------------------------------------------------------------------
# The noise
# ------------------------------------------------------------------------------------------------


def test_philox_known_answers():
    """Philox4x32-10 test vectors of the Random123 distribution (kat_vectors)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for ctr, key, want in cases:
        assert tuple(int(x) for x in philox4x32_10(*ctr, *key)) == want


def test_every_backend_computes_the_same_noise():
    """The reference definition, the C++ kernel, the torch ops and the Triton kernel agree to an
    ulp or two of float32, for any row offset (so the noise does not depend on the tiling)."""
    seed, row0, rows, V = 2**40 + 977, 3, 4, 1031
    want = thought_gumbel_noise(seed, rows, V, row_offset=row0)
    assert torch.equal(want, thought_gumbel_noise(seed, rows + row0, V)[row0:])
    got = {
        "cpu": _ext.cpu_extension().lm_head_gumbel_noise(seed, row0, rows, V),
        "torch": philox_gumbel_torch(seed, row0, rows, 0, V, "cpu"),
        "torch, from id 516": torch.cat(
            [
                philox_gumbel_torch(seed, row0, rows, 0, 516, "cpu"),
                philox_gumbel_torch(seed, row0, rows, 516, V - 516, "cpu"),
            ],
            1,
        ),
    }
    require("triton")
    from qstar_kernels.backends.lm_head.triton import gumbel_noise_triton

    got["triton"] = gumbel_noise_triton(seed, row0, rows, V, "cpu")
    for name, g in got.items():
        assert g.dtype == torch.float32 and g.shape == want.shape
        assert (g - want).abs().max() <= 2e-6 * want.abs().max(), name
    assert -2.82 < want.min() and want.max() < 16.7  # u is never 0 or 1


def test_noise_moments():
    g = thought_gumbel_noise(12345, 64, 4096).double()
    assert abs(g.mean().item() - 0.5772156649) < 0.01  # Euler-Mascheroni
    assert abs(g.std().item() - math.pi / math.sqrt(6)) < 0.01


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "reference", "torch", "cpu"])
class TestBadInput:
    def call(self, backend, h=None, weight=None, **kw):
        h0, w0 = make_inputs(5, 11, 8)
        return sample_thought_tokens(
            h0 if h is None else h, w0 if weight is None else weight, backend=backend, **kw
        )

    def test_h_and_weight(self, backend):
        with pytest.raises(TypeError, match=r"h must be a torch.Tensor \(N, H\), got ndarray"):
            self.call(backend, h=np.zeros((5, 8)))
        with pytest.raises(ValueError, match=r"h must be 2-D \(N, H\), got 1-D with shape \(8,\)"):
            self.call(backend, h=torch.randn(8))
        with pytest.raises(TypeError, match=r"h must have a floating dtype .*got torch.int64"):
            self.call(backend, h=torch.ones(5, 8, dtype=torch.int64))
        with pytest.raises(
            ValueError, match=r"weight must have shape \(V, H\) with V >= 1 and H=8 .*got \(11, 9\)"
        ):
            self.call(backend, weight=torch.randn(11, 9))
        with pytest.raises(TypeError, match=r"weight must have h's dtype torch.float32, got torch.bfloat16"):
            self.call(backend, weight=torch.randn(11, 8).bfloat16())
        with pytest.raises(ValueError, match=r"weight must be on cpu like h, got meta"):
            self.call(backend, weight=torch.randn(11, 8, device="meta"))

    def test_banned_ids(self, backend):
        with pytest.raises(ValueError, match=r"banned_ids must be in \[0, V=11\), got 11"):
            self.call(backend, banned_ids=[1, 11])
        with pytest.raises(ValueError, match=r"banned_ids must be in \[0, V=11\), got -2"):
            self.call(backend, banned_ids=torch.tensor([-2, 3]))
        with pytest.raises(ValueError, match=r"banned_ids bans all V=11 ids"):
            self.call(backend, banned_ids=list(range(11)) + [3])
        with pytest.raises(
            TypeError, match=r"banned_ids must hold integer ids, got a tensor of torch.float32"
        ):
            self.call(backend, banned_ids=torch.tensor([1.0]))
        with pytest.raises(ValueError, match=r"banned_ids must be 1-D, got shape \(1, 2\)"):
            self.call(backend, banned_ids=torch.tensor([[1, 2]]))
        with pytest.raises(TypeError, match=r"banned_ids\[1\] must be an int, got float 2.5"):
            self.call(backend, banned_ids=[1, 2.5])
        with pytest.raises(TypeError, match=r"banned_ids must be None, a sequence of ints .*got str"):
            self.call(backend, banned_ids="3")

    def test_bad_banned_ids_leave_the_generator_alone(self, backend):
        g = torch.Generator().manual_seed(5)
        with pytest.raises(ValueError, match=r"banned_ids must be in \[0, V=11\), got 11"):
            self.call(backend, banned_ids=[1, 11], generator=g)
        assert torch.equal(
            torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(5))
        )

    def test_temperatures(self, backend):
        with pytest.raises(ValueError, match=r"temperature must be >= 0 \(0 = greedy\), got -1.0"):
            self.call(backend, temperature=-1.0)
        with pytest.raises(ValueError, match=r"temperature must be a real number >= 0 \(finite\), got nan"):
            self.call(backend, temperature=float("nan"))
        with pytest.raises(TypeError, match=r"temperature must be a real number >= 0, got str"):
            self.call(backend, temperature="1")
        with pytest.raises(TypeError, match=r"temperature must be a real number >= 0, got bool"):
            self.call(backend, temperature=True)
        with pytest.raises(TypeError, match=r"temperature must be a real number >= 0, got Tensor"):
            self.call(backend, temperature=torch.tensor(1.0, requires_grad=True))
        with pytest.raises(ValueError, match=r"logprob_temperature must be > 0, got 0.0"):
            self.call(backend, logprob_temperature=0)
        with pytest.raises(
            ValueError, match=r"logprob_temperature must be a real number > 0 \(finite\), got inf"
        ):
            self.call(backend, logprob_temperature=float("inf"))

    def test_generator(self, backend):
        with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int"):
            self.call(backend, generator=3)


def test_bad_backend_name():
    h, weight = make_inputs(5, 11, 8)
    with pytest.raises(
        ValueError, match=r"backend must be one of \('reference', 'torch', 'cpu', 'triton', 'cuda'\).*'flash'"
    ):
        sample_thought_tokens(h, weight, backend="flash")
    # 'cuda' is a backend of mixed_token_logprobs only: a clear error, not a silent substitute.
    with pytest.raises(BackendUnavailableError, match=r"implements mixed_token_logprobs only"):
        sample_thought_tokens(h, weight, backend="cuda")


# ------------------------------------------------------------------------------------------------
# On a GPU (skipped, with the reason, where there is none; `pytest -m gpu` selects these)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize(
    "case", [CASES[3], dict(N=1000, V=50000, H=128, T=1.0, banned=[3, 5], tiles=None)], ids=_case_id
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_on_cuda_matches_reference_token_for_token(backend, case, dtype, seed):
    _check(backend, case, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_on_cuda_draws_the_documented_noise(seed):
    """The GPU kernel draws the noise of the reference definition, as the CPU kernel does: the
    same seed gives the same tokens on either device (up to float near-ties)."""
    h, weight = make_inputs(64, 32000, 128)
    noise = thought_gumbel_noise(draw_sampling_seed(torch.Generator(device="cuda").manual_seed(4)), 64, 32000)
    want, _ = sample_thought_tokens_reference(h.double(), weight.double(), noise)
    got, _ = sample_thought_tokens(
        h.cuda(), weight.cuda(), generator=torch.Generator(device="cuda").manual_seed(4), backend="triton"
    )
    keys = masked_logits64(h, weight, None) + noise.double()
    assert_same_tokens(got.cpu(), want, keys, 1e-3)  # float32 GEMMs may run in TF32 on the GPU
