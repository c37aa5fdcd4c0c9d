"""The custom ops of ``qstar_kernels.custom_ops`` (the fused paths of the three public ops):
``torch.library.opcheck`` (schema, fake implementation, autograd registration), the fake (meta)
implementations torch.compile uses, and ``torch.compile(fullgraph=True)`` of small models that call
the public ops (no graph break, the eager result)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_padding, make_qkv

from qstar_kernels import mixed_token_logprobs, sample_thought_tokens, thought_attention

ON_GPU = torch.cuda.is_available()
interpreter = pytest.mark.skipif(
    ON_GPU, reason="interpreter tests; on a GPU the GPU tests compile the kernels"
)
TRITON = pytest.param("triton", marks=interpreter)
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (none visible)")]
ops = torch.ops.qstar


# ------------------------------------------------------------------------------------------------
# The fake implementations: shapes and dtypes without running a kernel
# ------------------------------------------------------------------------------------------------


def test_fake_implementations_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 4, 10, 16, dtype=torch.float16)
        k = torch.empty(2, 2, 30, 16, dtype=torch.float16)
        out, lse = ops.thought_attention_fwd(q, k, k, None, 0.25, -1, "triton")
        assert out.shape == q.shape and out.dtype == torch.float16
        assert lse.shape == (2, 4, 10) and lse.dtype == torch.float32
        dq, dk, dv = ops.thought_attention_bwd(out, lse, q, k, k, out, lse, None, 0.25, -1, "triton")
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape

        h = torch.empty(7, 16, dtype=torch.bfloat16)
        weight = torch.empty(50, 16, dtype=torch.bfloat16)
        w = torch.empty(7, 1)
        target = torch.empty(7, dtype=torch.int64)
        logp, lse = ops.mixed_token_logprobs_fwd(h, h, w, weight, target, -100, "cpu")
        assert logp.shape == lse.shape == (7,) and logp.dtype == torch.float32
        g = ops.mixed_token_logprobs_bwd(
            logp, h, h, w, weight, target, lse, -100, "cpu", [True, False, True, True]
        )
        assert [t.shape for t in g] == [h.shape, (0,), w.shape, weight.shape]
        assert [t.dtype for t in g] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16]

        seed = torch.empty((), dtype=torch.int64)
        logp, tokens, lse = ops.sample_thought_tokens_fwd(h, weight, None, seed, 1.0, 3.0, "torch")
        assert tokens.dtype == torch.int64 and tokens.shape == logp.shape == lse.shape == (7,)
        g_h, g_w = ops.sample_thought_tokens_bwd(
            logp, h, weight, None, tokens, lse, 3.0, "torch", [False, True]
        )
        assert g_h.shape == (0,) and g_w.shape == weight.shape and g_w.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# opcheck
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", TRITON])
def test_attention_op_passes_opcheck(backend, seed):
    q, k, v = make_qkv(1, 2, 1, 8, 1, 16, requires_grad=True)
    keep = make_padding(1, 8, "end")
    torch.library.opcheck(ops.thought_attention_fwd.default, (q, k, v, keep, 0.25, -1, backend))


def _lm_args(N=6, V=37, H=8, dtype=torch.float32):
    hb = torch.randn(N, H, dtype=dtype, requires_grad=True)
    ht = torch.randn(N, H, dtype=dtype, requires_grad=True)
    w = torch.randn(N, 1, requires_grad=True)
    weight = torch.randn(V, H, dtype=dtype, requires_grad=True)
    target = torch.randint(0, V, (N,))
    target[2] = -100
    return hb, ht, w, weight, target


@pytest.mark.parametrize("backend", ["torch", "cpu", TRITON])
def test_mixed_token_logprobs_ops_pass_opcheck(backend, seed):
    hb, ht, w, weight, target = _lm_args()
    torch.library.opcheck(ops.mixed_token_logprobs_fwd.default, (hb, ht, w, weight, target, -100, backend))
    torch.library.opcheck(
        ops.mixed_token_logprobs_fwd.default, (hb, None, None, weight, target, -100, backend)
    )
    _, lse = ops.mixed_token_logprobs_fwd(hb, ht, w, weight, target, -100, backend)
    g = torch.randn(hb.shape[0])
    args = (g, hb.detach(), ht.detach(), w.detach(), weight.detach(), target, lse, -100, backend)
    torch.library.opcheck(ops.mixed_token_logprobs_bwd.default, args + ([True, True, True, True],))
    torch.library.opcheck(ops.mixed_token_logprobs_bwd.default, args + ([False, True, False, True],))


@pytest.mark.parametrize("temperature", [1.0, 0.0])
@pytest.mark.parametrize("backend", ["torch", "cpu", TRITON])
def test_sample_thought_tokens_ops_pass_opcheck(backend, temperature, seed):
    h = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(37, 8, requires_grad=True)
    banned = torch.tensor([3, 0, 3])
    s = torch.tensor(12345, dtype=torch.int64)
    torch.library.opcheck(
        ops.sample_thought_tokens_fwd.default, (h, weight, banned, s, temperature, 3.0, backend)
    )
    logp, tokens, lse = ops.sample_thought_tokens_fwd(h, weight, banned, s, temperature, 3.0, backend)
    args = (torch.randn(6), h.detach(), weight.detach(), banned, tokens, lse, 3.0, backend)
    torch.library.opcheck(ops.sample_thought_tokens_bwd.default, args + ([True, True],))


def test_the_ops_check_the_values_they_read():
    """The value checks (data-dependent) run inside the ops, with the public ops' messages."""
    hb, ht, w, weight, target = _lm_args()
    target[0] = 37
    with pytest.raises(ValueError, match=r"target values must be in \[0, V=37\) .*got 37"):
        ops.mixed_token_logprobs_fwd(hb, ht, w, weight, target, -100, "cpu")
    s = torch.tensor(1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"banned_ids must be in \[0, V=37\), got 40"):
        ops.sample_thought_tokens_fwd(hb, weight, torch.tensor([40]), s, 1.0, 3.0, "torch")


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break, and the eager result
# ------------------------------------------------------------------------------------------------


class _TinyThoughtLayer(torch.nn.Module):
    """Projections around thought_attention, as a model layer would call it."""

    def __init__(self, backend: str, Hq=4, Hkv=2, D=16):
        super().__init__()
        self.backend, self.Hq, self.Hkv, self.D = backend, Hq, Hkv, D
        hidden = Hq * D
        self.q = torch.nn.Linear(hidden, Hq * D, bias=False)
        self.kv = torch.nn.Linear(hidden, 2 * Hkv * D, bias=False)
        self.o = torch.nn.Linear(Hq * D, hidden, bias=False)

    def forward(self, x_step, kv_cache_in, keep):
        B, L, _ = x_step.shape
        q = self.q(x_step).view(B, L, self.Hq, self.D).transpose(1, 2)
        kv_new = self.kv(x_step).view(B, L, 2, self.Hkv, self.D)
        k_new, v_new = kv_new[:, :, 0].transpose(1, 2), kv_new[:, :, 1].transpose(1, 2)
        k = torch.cat([kv_cache_in[0], k_new], dim=2)
        v = torch.cat([kv_cache_in[1], v_new], dim=2)
        out, lse = thought_attention(
            q, k, v, key_padding_mask=keep, sliding_window=9, return_lse=True, backend=self.backend
        )
        y = self.o(out.transpose(1, 2).reshape(B, L, -1))
        return y, lse


@pytest.mark.parametrize("backend", ["cpu", TRITON])
def test_attention_under_torch_compile_fullgraph(backend, seed):
    torch._dynamo.reset()
    layer = _TinyThoughtLayer(backend)
    B, L, depth = 2, 12, 2
    x = torch.randn(B, L, layer.Hq * layer.D)
    cache = torch.randn(2, B, layer.Hkv, depth * L, layer.D)
    keep = make_padding(B, L, "both")

    def loss_and_grads(fn):
        layer.zero_grad()
        y, lse = fn(x, cache, keep)
        (y.square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
        return y.detach(), lse.detach(), [p.grad.clone() for p in layer.parameters()]

    want = loss_and_grads(layer)
    compiled = torch.compile(layer, fullgraph=True)  # inductor, the default
    got = loss_and_grads(compiled)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w)


class _TinyHead(torch.nn.Module):
    """A mixing head and an LM head around the two LM-head ops, as the qstar model calls them:
    the log-probabilities of the targets under the mixed head, and thought tokens sampled (and
    their REINFORCE log-probabilities) from the thought stream."""

    def __init__(self, backend: str, H=16, V=53):
        super().__init__()
        self.backend = backend
        self.lm_head = torch.nn.Linear(H, V, bias=False)
        self.mix = torch.nn.Linear(2 * H, 1)

    def forward(self, h_base, h_thought, target, temperature: float):
        w = self.mix(torch.cat([h_base, h_thought], dim=-1))  # (N, 1)
        logp = mixed_token_logprobs(
            h_base, h_thought, w, self.lm_head.weight, target, backend=self.backend
        )  # (N,)
        tokens, logp_thought = sample_thought_tokens(
            h_thought, self.lm_head.weight, banned_ids=[0, 1], temperature=temperature, backend=self.backend
        )
        return logp, tokens, logp_thought


@pytest.mark.parametrize("backend", ["cpu"])
def test_lm_head_ops_under_torch_compile_fullgraph(backend, seed):
    torch._dynamo.reset()
    head = _TinyHead(backend)
    N, H = 10, 16
    h_base = torch.randn(N, H, requires_grad=True)
    h_thought = torch.randn(N, H, requires_grad=True)
    target = torch.randint(0, 53, (N,))
    target[3] = -100

    def run(fn, temperature):
        head.zero_grad()
        h_base.grad = h_thought.grad = None
        logp, tokens, logp_thought = fn(h_base, h_thought, target, temperature)
        (logp.sum() + logp_thought.sum()).backward()
        grads = [p.grad.clone() for p in head.parameters()] + [h_base.grad.clone(), h_thought.grad.clone()]
        return logp.detach(), tokens, logp_thought.detach(), grads

    # dynamic=False: the temperature stays a constant of each graph (as a model's config is).
    compiled = torch.compile(head, fullgraph=True, dynamic=False)
    # Greedy: the same tokens and every gradient as eager.
    want, got = run(head, 0.0), run(compiled, 0.0)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])
    for g, w in zip(got[3], want[3]):
        torch.testing.assert_close(g, w)
    # Sampled: the seed is drawn inside the graph (the compiled RNG differs from eager's), so the
    # tokens are valid draws and their log-probabilities are the reference's for those tokens.
    logp, tokens, logp_thought, _ = run(compiled, 1.0)
    assert tokens.shape == (N,) and ((tokens >= 2) & (tokens < 53)).all()
    logits = (h_thought.detach() @ head.lm_head.weight.detach().T) / 3.0
    logits[:, :2] = float("-inf")
    want_lp = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logp_thought, want_lp, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# On a GPU (skipped, with the reason, where there is none)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@needs_gpu[0]
@needs_gpu[1]
def test_gpu_attention_under_torch_compile_fullgraph(backend, seed):
    q, k, v = make_qkv(2, 8, 2, 64, 3, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)

    def f(q, k, v):
        return thought_attention(q * 2, k, v, sliding_window=16, backend=backend).float().square().sum()

    want = torch.autograd.grad(f(q, k, v), (q, k, v))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@needs_gpu[0]
@needs_gpu[1]
def test_gpu_lm_head_ops_under_torch_compile_fullgraph(backend, seed):
    torch._dynamo.reset()
    head = _TinyHead("triton").cuda()
    head.backend = backend  # mixed_token_logprobs on 'cuda'; sampling has no 'cuda' backend

    def f(h_base, h_thought, target):
        w = head.mix(torch.cat([h_base, h_thought], dim=-1))
        return mixed_token_logprobs(h_base, h_thought, w, head.lm_head.weight, target, backend=backend).sum()

    h_base = torch.randn(10, 16, device="cuda", requires_grad=True)
    h_thought = torch.randn(10, 16, device="cuda", requires_grad=True)
    target = torch.randint(0, 53, (10,), device="cuda")
    want = torch.autograd.grad(f(h_base, h_thought, target), (h_base, h_thought))
    got = torch.autograd.grad(
        torch.compile(f, fullgraph=True)(h_base, h_thought, target), (h_base, h_thought)
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
