"""Tests of the plain Quiet-STaR training forward (qstar/reference.py), the oracle that the
optimised implementation is compared against. Tiny random MistralForCausalLM, float32, CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from tiny_models import tiny_lm  # noqa: E402

from qstar.reference import (  # noqa: E402
    base_causal_mask,
    extend_mask,
    gumbel_hard_sample,
    plain_quietstar_forward,
)

V_TEXT = 96
START_ID, END_ID = 96, 97
V = V_TEXT + 2
PAD = 0
H = 32
B, L = 2, 16
T, K, P = 5, 3, 2
R = B * P
N_PAD = 4  # row 0 (rows 0 and 1 after duplication) ends with N_PAD pad positions
LAST_REAL = L - N_PAD - 1


def make_setup(seed: int = 0, zero_head: bool = False):
    torch.manual_seed(seed)  # the heads and meta embeddings below draw from the global RNG
    lm = tiny_lm(
        V,
        hidden=H,
        max_position_embeddings=128,
        initializer_range=0.1,  # larger than default: attention patterns far from uniform
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=None,
        seed=seed,
    )
    head = torch.nn.Sequential(
        torch.nn.Linear(2 * H, H),
        torch.nn.ReLU(),
        torch.nn.Linear(H, H),
        torch.nn.ReLU(),
        torch.nn.Linear(H, 1, bias=False),
    )
    with torch.no_grad():
        if zero_head:
            head[4].weight.zero_()
        else:
            head[4].weight.normal_(0.0, 1.0)
    start = torch.nn.Parameter(torch.randn(2, H) * 0.01)
    end = torch.nn.Parameter(torch.randn(2, H) * 0.01)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, V_TEXT, (B, L), generator=g)
    keep = torch.ones(B, L, dtype=torch.long)
    keep[0, L - N_PAD :] = 0
    ids[keep == 0] = PAD
    thoughts = torch.randint(0, V_TEXT, (T - 3, R, L), generator=g)
    return lm, head, start, end, ids, keep, thoughts


def forward(lm, head, start, end, ids, keep, thoughts, **kw):
    args = dict(n_ahead=T, n_ahead_talk=K, n_passes=P, start_id=START_ID, end_id=END_ID, pad_token_id=PAD)
    args.update(kw)
    return plain_quietstar_forward(lm, head, start, end, ids, keep, thought_tokens=thoughts, **args)


def test_mask_matches_the_note_example():
    """The worked mask example (``docs/algorithm.md``, "The thought mask"): L=5, last position
    padding, step 2."""
    keep = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    m = extend_mask(extend_mask(base_causal_mask(keep, torch.float32), 5), 5)
    assert m.shape == (1, 1, 5, 15)
    allowed = (m[0, 0] == 0).int()
    base = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    diag = torch.diag(torch.tensor([1, 1, 1, 1, 0]))
    assert torch.equal(allowed, torch.cat([base, diag, diag], dim=1))
    assert set(m.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}


def test_zero_mixing_head_gives_the_base_model():
    lm, head, start, end, ids, keep, thoughts = make_setup(zero_head=True)
    out = forward(lm, head, start, end, ids, keep, thoughts)
    assert out["mixing_weights"].shape == (K, R, L)
    assert torch.equal(out["mixing_weights"], torch.zeros(K, R, L))
    assert torch.equal(out["rewards"], torch.zeros(R, L - K - 1))
    assert torch.equal(out["advantages"], torch.zeros(R, L - K - 1))
    assert out["policy_loss"].item() == 0.0
    for s in range(K):
        # Talk logits are the base logits of position j+s: the same CE on the same targets.
        assert torch.equal(out["talk_ce"][s], out["base_ce"][:, s:])
    assert torch.equal(out["talk_nll"][0], out["base_nll"])
    expected = 0.5 * out["base_nll"] + 0.5 * out["talk_nll"].mean()
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=0)


def test_shapes_and_loss_composition():
    lm, head, start, end, ids, keep, thoughts = make_setup()
    out = forward(lm, head, start, end, ids, keep, thoughts)
    assert out["loss"].shape == () and out["base_nll"].shape == () and out["policy_loss"].shape == ()
    assert out["talk_nll"].shape == (K,)
    assert out["rewards"].shape == out["advantages"].shape == (R, L - K - 1)
    assert out["thought_tokens"].shape == out["thought_logprobs"].shape == (T - 3, R, L)
    assert torch.equal(out["thought_tokens"], thoughts)
    assert [tuple(c.shape) for c in out["talk_ce"]] == [(R, L - 1 - s) for s in range(K)]
    assert out["base_ce"].shape == (R, L - 1)
    # Pad labels are ignored; loss_mean divides by the non-zero count.
    labels = ids.repeat_interleave(P, 0)
    assert torch.equal(out["base_ce"] == 0, labels[:, 1:] == PAD)
    torch.testing.assert_close(out["base_nll"], out["base_ce"].sum() / (labels[:, 1:] != PAD).sum())
    # Policy loss from the returned pieces; total loss.
    n = L - K - 1
    pol = sum((-out["advantages"] * out["thought_logprobs"][k, :, :n]).mean() for k in range(T - 3)) / (T - 3)
    torch.testing.assert_close(out["policy_loss"], pol, rtol=1e-6, atol=0)
    assert out["policy_loss"].item() != 0.0
    total = 0.5 * out["base_nll"] + 0.5 * out["talk_nll"].mean() + 1e6 * out["policy_loss"]
    torch.testing.assert_close(out["loss"], total, rtol=1e-6, atol=0)
    # Rewards: sum over s of (base CE at j+s, detached) - (talk CE), first L-K-1 positions.
    r = sum(out["base_ce"][:, s : s + n] - out["talk_ce"][s][:, :n] for s in range(K))
    torch.testing.assert_close(out["rewards"], r, rtol=1e-5, atol=1e-6)


def test_advantage_arithmetic():
    lm, head, start, end, ids, keep, thoughts = make_setup()
    out = forward(lm, head, start, end, ids, keep, thoughts)
    r = out["rewards"].detach().reshape(B, P, -1)
    adv = out["advantages"]
    assert not adv.requires_grad
    assert (adv >= 0).all()
    assert (adv > 0).any()
    want = (r - r.mean(1, keepdim=True)).clamp(min=0).reshape(R, -1)
    torch.testing.assert_close(adv, want, rtol=0, atol=0)
    # With P = 2 only the better copy is reinforced, with weight |r1 - r2| / 2.
    torch.testing.assert_close(adv.reshape(B, P, -1).mean(1), (r[:, 0] - r[:, 1]).abs() / 4)
    torch.testing.assert_close(adv.reshape(B, P, -1).max(1).values, (r[:, 0] - r[:, 1]).abs() / 2)
    assert (adv.reshape(B, P, -1).min(1).values == 0).all()
    # Without clipping: the centred reward, summing to zero over the copies.
    out2 = forward(lm, head, start, end, ids, keep, thoughts, remove_negative_rewards=False)
    a2 = out2["advantages"].reshape(B, P, -1)
    assert (a2 < 0).any()
    torch.testing.assert_close(a2.sum(1), torch.zeros_like(a2[:, 0]), rtol=0, atol=1e-6)


def test_thoughts_are_private_to_their_position():
    lm, head, start, end, ids, keep, thoughts = make_setup()
    out = forward(lm, head, start, end, ids, keep, thoughts)
    for k, r, j in [(0, 2, 5), (T - 4, 1, LAST_REAL)]:
        t2 = thoughts.clone()
        t2[k, r, j] = (t2[k, r, j] + 1) % V_TEXT
        out2 = forward(lm, head, start, end, ids, keep, t2)
        other = torch.ones(R, L, dtype=torch.bool)
        other[r, j] = False
        assert torch.equal(out2["base_ce"], out["base_ce"])
        for name in ("thought_logprobs", "mixing_weights"):
            a, b = out[name], out2[name]
            assert torch.equal(a[:, other], b[:, other]), name
            assert not torch.equal(a[:, r, j], b[:, r, j]), name
        for s in range(K):
            a, b = out["talk_ce"][s], out2["talk_ce"][s]
            o = other[:, : L - 1 - s]
            assert torch.equal(a[o], b[o])
        n = L - K - 1
        assert torch.equal(out["rewards"][other[:, :n]], out2["rewards"][other[:, :n]])


def sequential_stream(lm, head, start, end, ids, keep, thoughts, r, j, scale=100.0):
    """Quantities of ONE (row, position) from a plain causal decode of its stream
    x_0..x_j, <start>, t_1..t_{T-3}, <end>, x_{j+1}..x_{j+K-1}: no custom mask; default positions.
    The base hidden states come from an ordinary HF forward of the text with its 2-D padding mask."""
    E = lm.get_input_embeddings().weight
    row_ids = ids.repeat_interleave(P, 0)[r]
    row_keep = keep.repeat_interleave(P, 0)[r]
    padded = torch.cat([row_ids, torch.full((K,), PAD)])  # labels right-padded with pad_token_id
    pieces = [E[row_ids[: j + 1]], start[0:1] * scale]
    pieces += [E[thoughts[k, r, j]].unsqueeze(0) for k in range(T - 3)]
    pieces += [end[0:1] * scale, E[padded[j + 1 : j + K]]]
    seq = torch.cat(pieces).unsqueeze(0)
    assert seq.shape[1] == j + T + K - 1
    h = lm.model(inputs_embeds=seq).last_hidden_state[0]
    h_base = lm.model(input_ids=row_ids[None], attention_mask=row_keep[None]).last_hidden_state[0]
    logprobs = []
    for k in range(1, T - 2):  # thought step k: hidden at j + k
        z = lm.lm_head(h[j + k]).clone()
        z[[START_ID, END_ID]] = -1e10
        logprobs.append(F.log_softmax(z / 3.0, -1)[thoughts[k - 1, r, j]])
    ws, ces = [], []
    for s in range(K):  # talk step s: hidden at j + T - 1 + s, base hidden of position j + s
        hb, ht = h_base[j + s], h[j + T - 1 + s]
        w = head(torch.cat([hb, ht]))[0]
        z = lm.lm_head((1 - w) * hb + w * ht)
        label = padded[j + 1 + s]
        ws.append(w)
        ces.append(torch.tensor(0.0) if label == PAD else -F.log_softmax(z, -1)[label])
    return torch.stack(logprobs), torch.stack(ws), torch.stack(ces)


@pytest.mark.parametrize(
    "r,j",
    [
        (3, 0),  # first position, unpadded row
        (2, 6),  # interior
        (0, LAST_REAL - K + 1),  # talk window ends on the last real token; last label is padding
        (1, LAST_REAL),  # last real token: base hidden states of pad positions, pad labels
    ],
)
def test_matches_single_stream_sequential_decode(r, j):
    """The parallel dense-mask computation equals a plain causal decode of one position's stream."""
    lm, head, start, end, ids, keep, thoughts = make_setup()
    out = forward(lm, head, start, end, ids, keep, thoughts)
    with torch.no_grad():
        logprobs, ws, ces = sequential_stream(lm, head, start, end, ids, keep, thoughts, r, j)
    torch.testing.assert_close(out["thought_logprobs"][:, r, j], logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["mixing_weights"][:, r, j], ws, rtol=1e-5, atol=1e-5)
    assert ws.abs().min() > 1e-3  # the mixing head is really mixing
    got = torch.stack([out["talk_ce"][s][r, j] if j < L - 1 - s else torch.tensor(0.0) for s in range(K)])
    torch.testing.assert_close(got, ces, rtol=1e-5, atol=1e-5)


def test_sampling_path_is_reproducible_and_never_emits_meta_tokens():
    lm, head, start, end, ids, keep, _ = make_setup()
    runs = [
        forward(lm, head, start, end, ids, keep, None, generator=torch.Generator().manual_seed(s))
        for s in (7, 7, 8)
    ]
    toks = [o["thought_tokens"] for o in runs]
    for t in toks:
        assert t.shape == (T - 3, R, L) and t.dtype == torch.int64
        assert not ((t == START_ID) | (t == END_ID)).any()
        assert ((t >= 0) & (t < V)).all()
    assert torch.equal(toks[0], toks[1])
    assert torch.equal(runs[0]["loss"], runs[1]["loss"])
    assert not torch.equal(toks[0], toks[2])
    # Injecting the sampled tokens reproduces the sampled run.
    inj = forward(lm, head, start, end, ids, keep, toks[0])
    assert torch.equal(inj["loss"], runs[0]["loss"])
    # Without a generator, F.gumbel_softmax on the global RNG.
    torch.manual_seed(3)
    a = forward(lm, head, start, end, ids, keep, None)["thought_tokens"]
    torch.manual_seed(3)
    b = forward(lm, head, start, end, ids, keep, None)["thought_tokens"]
    assert torch.equal(a, b)
    assert not ((a == START_ID) | (a == END_ID)).any()


def test_gumbel_sampling_is_categorical_at_temperature_one():
    """Hard Gumbel-softmax (tau irrelevant) draws from softmax(z) at T=1, with or without a generator."""
    z = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(20000, 4)
    want = torch.softmax(z[0], -1)
    for gen in (torch.Generator().manual_seed(0), None):
        torch.manual_seed(0)
        t = gumbel_hard_sample(z, gen)
        freq = torch.bincount(t, minlength=4).float() / t.numel()
        torch.testing.assert_close(freq, want, rtol=0, atol=0.015)


@pytest.mark.parametrize(
    "bad,what",
    [
        (lambda t: t[:, :, :-1], "shape"),
        (lambda t: t[:-1], "shape"),
        (lambda t: t.unsqueeze(0), "shape"),
        (lambda t: t.index_fill(2, torch.tensor([3]), START_ID), "meta"),
        (lambda t: t.index_fill(1, torch.tensor([1]), END_ID), "meta"),
    ],
)
def test_invalid_thought_tokens_raise(bad, what):
    lm, head, start, end, ids, keep, thoughts = make_setup()
    with pytest.raises(ValueError, match="thought_tokens") as info:
        forward(lm, head, start, end, ids, keep, bad(thoughts))
    msg = str(info.value)
    assert "expected" in msg and "got" in msg
    if what == "shape":
        assert str((T - 3, R, L)) in msg


def test_gradients_reach_the_parameters():
    lm, head, start, end, ids, keep, thoughts = make_setup()
    out = forward(lm, head, start, end, ids, keep, thoughts)
    out["loss"].backward()
    emb, lm_head = lm.get_input_embeddings().weight, lm.lm_head.weight
    for name, p in [
        ("embed_tokens", emb),
        ("lm_head", lm_head),
        ("layer0.q", lm.model.layers[0].self_attn.q_proj.weight),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for i, p in enumerate(head.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"mixing head param {i}"
    for name, p in [("start", start), ("end", end)]:
        assert p.grad[0].abs().sum() > 0, name
        assert torch.equal(p.grad[1], torch.zeros(H)), name  # row 1 (log-std) is unused
    # Embedding rows of the thought tokens get gradient (through the one-hot matmul), and rows of
    # ids that appear nowhere get none. Thought tokens of positions whose every loss term is ignored
    # (pad labels) or cut (j >= L-K-1 in the policy term) get none, so only rows 2, 3 (no padding),
    # positions j < L-K-1 are asserted on.
    used = torch.zeros(V, dtype=torch.bool)
    used[ids.flatten()] = True
    used[thoughts.flatten()] = True
    assert emb.grad[~used].abs().sum() == 0
    assert (emb.grad[thoughts[:, 2:, : L - K - 1].flatten()].abs().sum(-1) > 0).all()

    # The policy term alone: nothing to the mixing head or to end_embedding; something to start.
    out = forward(lm, head, start, end, ids, keep, thoughts)
    params = [*head.parameters(), end, start, lm_head]
    grads = torch.autograd.grad(out["policy_loss"], params, allow_unused=True)
    for g in grads[: len(list(head.parameters())) + 1]:
        assert g is None or g.abs().sum() == 0
    assert grads[-2] is not None and grads[-2][0].abs().sum() > 0
    assert grads[-1] is not None and grads[-1].abs().sum() > 0


def test_intermediate_losses_do_not_change_results():
    lm, head, start, end, ids, keep, thoughts = make_setup()
    a = forward(lm, head, start, end, ids, keep, thoughts)
    b = forward(lm, head, start, end, ids, keep, thoughts, intermediate_losses=True)
    assert torch.equal(a["loss"], b["loss"])
    assert torch.equal(a["rewards"], b["rewards"])
    assert len(b["intermediate_ce"]) == T - 2
    assert all(c.shape == (R, L - 1) and not c.requires_grad for c in b["intermediate_ce"])
    # Sampling path too: the extra work draws no random numbers.
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = forward(lm, head, start, end, ids, keep, None, generator=ga)
    b = forward(lm, head, start, end, ids, keep, None, generator=gb, intermediate_losses=True)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["thought_tokens"], b["thought_tokens"])


def test_eval_mode_keeps_K_and_P_and_other_configs():
    """No eval-mode override: K and P stay as given. Also T=6, K=2, P=1 (no baseline: A = max(r, 0))."""
    lm, head, start, end, ids, keep, _ = make_setup()
    lm.eval()
    thoughts = torch.randint(0, V_TEXT, (6 - 3, B, L), generator=torch.Generator().manual_seed(0))
    out = forward(lm, head, start, end, ids, keep, thoughts, n_ahead=6, n_ahead_talk=2, n_passes=1)
    assert out["talk_nll"].shape == (2,) and out["mixing_weights"].shape == (2, B, L)
    torch.testing.assert_close(out["advantages"], out["rewards"].detach().clamp(min=0), rtol=0, atol=0)
