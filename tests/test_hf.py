"""qstar_kernels.hf: the Hugging Face patch.

A Quiet-STaR rollout on tiny random models (Mistral, Llama, Qwen2; 2 layers, hidden 64, GQA 4/2)
through the patch must match the unpatched SDPA model driven the authors' way (a dense 4-D additive
mask grown by one diagonal block per step), in hidden states, logits and every parameter gradient.
Ordinary use (forward, training, generate) must be exactly unchanged, patches must undo without a
trace, and bad input must fail clearly.

Padding. A query row that sees no key at all (left padding before the first real token) gets zeros
from thought attention (its contract), while the authors' additive mask makes it a uniform average
over all keys. Those rows never feed a real token (their keys are masked for everyone), so outputs
and gradients are compared on every row that sees at least one key; the patched model must be
finite everywhere.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face patch needs transformers (pip install 'qstar-kernels[hf]')"
)

from tiny_models import tiny_lm  # noqa: E402

from qstar_kernels import build_additive_thought_mask, dispatch  # noqa: E402
from qstar_kernels.hf import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    SUPPORTED_RANGE,
    UnsupportedTransformersError,
    apply_qstar_kernels,
    apply_qstar_kernels_to_llama,
    apply_qstar_kernels_to_mistral,
    apply_qstar_kernels_to_qwen2,
    cache_keyword,
    is_patched,
    patched_model_types,
    revert_qstar_kernels,
    thought_step,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 128
REL = 1e-5  # "within fp32 rounding", relative to the largest magnitude of each compared tensor


def _interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return AttentionInterface, AttentionMaskInterface


_ORIGINAL_SDPA = tuple(iface._global_mapping["sdpa"] for iface in _interfaces())


@pytest.fixture(autouse=True)
def _clean_patches():
    """Every test starts and ends with no patch applied and the fallback warning not yet shown."""
    revert_qstar_kernels()
    dispatch._warned.clear()
    yield
    revert_qstar_kernels()
    dispatch._warned.clear()


def make_model(arch: str, seed: int = 0, sliding_window: int | None = None, **overrides):
    """A tiny random-initialised causal LM with GQA (4 query heads, 2 key/value heads), SDPA attention."""
    common = dict(hidden=64, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if arch == "mistral":
        common["sliding_window"] = sliding_window
    common.update(overrides)
    torch.manual_seed(seed)
    model = tiny_lm(VOCAB, arch=arch, seed=seed, **common)
    assert model.config._attn_implementation == common.get("attn_implementation", "sdpa")
    return model


def make_keep(B: int, L: int) -> torch.Tensor:
    """Row 0: right padding; row 1: left padding; row 2 (if any): none; further rows: both sides."""
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, L - L // 4 :] = False
    if B > 1:
        keep[1, : L // 3] = False
    for b in range(3, B):
        keep[b, : L // 8 + 1] = False
        keep[b, L - L // 5 :] = False
    return keep


def sees_something(keep: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, L): the queries that see at least one key: a real text key j <= i (and i - j < W with a
    window). Without a window only left padding before the first real token sees nothing."""
    seen = keep.long().cumsum(1)
    if window is not None:
        seen = seen - torch.nn.functional.pad(seen, (window, 0))[:, : keep.shape[1]]
    return seen > 0


def rollout(
    model, tokens, keep, *, fused: bool, window: int | None = None, hidden: bool = True, ordinary_step0=False
):
    """Run the Quiet-STaR steps: step 0 on the text, then one new token per position per step.

    fused=True: inside thought_step, no attention_mask (the patched path). fused=False: the authors'
    way, the dense additive mask (B, 1, L, (a+1)L) built per step and passed as attention_mask.
    ordinary_step0: run step 0 of the fused rollout as an ordinary forward with the 2-D mask.
    Position ids j + a, a DynamicCache that grows by L keys per step (``docs/algorithm.md``,
    "The parallel rollout").
    Returns per step (logits, hidden_states tuple).
    """
    from transformers import DynamicCache

    B, L = keep.shape
    pos = torch.arange(L).unsqueeze(0)  # (1, L), broadcast over the batch like the authors'
    cache = DynamicCache()
    outs = []
    for a, tok in enumerate(tokens):
        kwargs = dict(
            input_ids=tok,
            position_ids=pos + a,
            use_cache=True,
            output_hidden_states=hidden,
            **{cache_keyword(model): cache},
        )
        if fused and a == 0 and ordinary_step0:
            out = model(attention_mask=keep.long(), **kwargs)
        elif fused:
            with thought_step(keep, step=a) as st:
                out = model(**kwargs)
            assert st.calls == model.config.num_hidden_layers
        else:
            mask = build_additive_thought_mask(L, a, keep, sliding_window=window, dtype=torch.float32)
            out = model(attention_mask=mask, **kwargs)
        assert cache.get_seq_length() == (a + 1) * L
        outs.append((out.logits, out.hidden_states))
    return outs


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / max(scale, 1e-30)


def assert_rel_close(name: str, got: torch.Tensor, want: torch.Tensor, rel: float = REL) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(want).all(), f"{name}: the dense-mask baseline is not finite"
    assert torch.isfinite(got).all(), f"{name}: non-finite values on the patched side"
    assert want.abs().max() > 0, f"{name}: the baseline is all zeros, nothing is compared"
    err = rel_err(got, want)
    assert err <= rel, f"{name}: relative error {err:.3e} > {rel:.0e}"


def compare_rollouts(fused_outs, dense_outs, keep, window=None):
    vis = sees_something(keep, window)
    for a, ((lf, hf), (ld, hd)) in enumerate(zip(fused_outs, dense_outs)):
        assert torch.isfinite(lf).all(), (
            f"step {a}: non-finite logits on the patched side (padded rows included)"
        )
        assert_rel_close(f"step {a} logits", lf[vis], ld[vis])
        assert len(hf) == len(hd)
        for i, (x, y) in enumerate(zip(hf, hd)):
            assert torch.isfinite(x).all(), f"step {a} hidden state {i}: non-finite on the patched side"
            assert_rel_close(f"step {a} hidden state {i}", x[vis], y[vis])


def rollout_loss(outs, keep, weights, window=None):
    """A scalar of every step's logits on the rows that see something, with fixed random weights."""
    vis = sees_something(keep, window)
    return sum((logits[vis] * w).sum() for (logits, _), w in zip(outs, weights))


def check_rollout_and_grads(arch, *, B, L, steps, window=None, seed=0):
    base = make_model(arch, seed=seed, sliding_window=window)
    patched = apply_qstar_kernels(copy.deepcopy(base))
    assert patched.config._attn_implementation == ATTN_IMPLEMENTATION
    g = torch.Generator().manual_seed(seed + 1)
    keep = make_keep(B, L)
    tokens = [torch.randint(2, VOCAB, (B, L), generator=g) for _ in range(steps)]
    n_vis = int(sees_something(keep, window).sum())
    weights = [torch.randn(n_vis, VOCAB, generator=g) for _ in range(steps)]

    dense = rollout(base, tokens, keep, fused=False, window=window)
    rollout_loss(dense, keep, weights, window).backward()
    fused = rollout(patched, tokens, keep, fused=True)
    rollout_loss(fused, keep, weights, window).backward()

    compare_rollouts(fused, dense, keep, window)
    named_base = dict(base.named_parameters())
    n = 0
    for name, p in patched.named_parameters():
        q = named_base[name]
        assert p.grad is not None and q.grad is not None, f"{name}: no gradient"
        assert_rel_close(f"grad {name}", p.grad, q.grad)
        n += 1
    assert n == len(named_base) and n > 10
    return fused, dense, keep, tokens


# --------------------------------------------------------------------------------------------
# The thought rollout: patched vs the authors' dense mask
# --------------------------------------------------------------------------------------------


def test_issue_case_mistral_8_steps_L64_with_padding():
    """The issue's acceptance case: tiny Mistral, 8 steps, L=64, padding; logits, hidden states and
    every parameter gradient (backward through the whole rollout) within relative 1e-5."""
    check_rollout_and_grads("mistral", B=3, L=64, steps=8)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rollout_matches_dense_mask_other_architectures(arch):
    check_rollout_and_grads(arch, B=4, L=24, steps=5, seed=3)


def test_rollout_under_bf16_autocast_matches_dense_mask():
    """Under torch.autocast RoPE's float32 cos/sin promote q and k back to float32 while v stays
    bfloat16; the patched attention casts all three to the autocast dtype (as SDPA computes) instead
    of failing on mixed dtypes. The fp32-weight model then agrees with the dense-mask model under
    the same autocast within bf16 rounding, and gradients flow."""
    base = make_model("mistral", seed=5)
    patched = apply_qstar_kernels(copy.deepcopy(base))
    g = torch.Generator().manual_seed(6)
    B, L, steps = 2, 16, 4
    keep = make_keep(B, L)
    tokens = [torch.randint(2, VOCAB, (B, L), generator=g) for _ in range(steps)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = rollout(patched, tokens, keep, fused=True, hidden=False)
        dense = rollout(base, tokens, keep, fused=False, hidden=False)
    seen = sees_something(keep)
    for (got, _), (want, _) in zip(fused, dense):
        assert got.dtype == want.dtype
        assert torch.isfinite(got).all()
        assert rel_err(got[seen].float(), want[seen].float()) < 3e-2
    sum(lg[seen].float().sum() for lg, _ in fused).backward()
    grads = [p.grad for p in patched.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_rollout_after_an_ordinary_text_pass():
    """Step 0 as an ordinary forward (2-D padding mask, transformers' own causal mask), then the
    thought steps inside thought_step: the same as the dense-mask rollout."""
    base = make_model("mistral", seed=29)
    patched = apply_qstar_kernels(copy.deepcopy(base))
    keep = make_keep(4, 16)
    g = torch.Generator().manual_seed(29)
    tokens = [torch.randint(2, VOCAB, (4, 16), generator=g) for _ in range(4)]
    with torch.no_grad():
        dense = rollout(base, tokens, keep, fused=False)
        fused = rollout(patched, tokens, keep, fused=True, ordinary_step0=True)
    compare_rollouts(fused, dense, keep)


def test_rollout_with_sliding_window_matches_dense_mask_with_window():
    """Mistral's config.sliding_window applies to the text block with transformers' definition
    (query i sees text key j iff i - j < W): the patched model passes it to thought_attention and
    matches the dense mask built with the same window."""
    W = 5
    fused, dense, keep, tokens = check_rollout_and_grads("mistral", B=3, L=20, steps=4, window=W, seed=5)
    # The window really changes the result, so the comparison above could have failed.
    with torch.no_grad():
        unwindowed = rollout(make_model("mistral", seed=5), tokens, keep, fused=False, hidden=False)
    vis = sees_something(keep, W)
    assert rel_err(unwindowed[-1][0][vis], dense[-1][0][vis].detach()) > 1e-3


def test_sliding_window_definition_agrees_with_transformers():
    """Step 0 with a window W < L: the fused path (thought_step, step 0) equals the unpatched model's
    ordinary forward, whose mask transformers builds from config.sliding_window; and differs from the
    model without a window."""
    W, B, L = 4, 2, 16
    base = make_model("mistral", seed=7, sliding_window=W)
    patched = apply_qstar_kernels(copy.deepcopy(base))
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, -3:] = False
    ids = torch.randint(2, VOCAB, (B, L), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=keep.long()).logits
        with thought_step(keep, step=0):
            got = patched(input_ids=ids).logits
        unwindowed = make_model("mistral", seed=7)(input_ids=ids, attention_mask=keep.long()).logits
    assert_rel_close("windowed step 0", got, want)
    assert rel_err(unwindowed, want) > 1e-3, "the window W < L must change the result"


# --------------------------------------------------------------------------------------------
# Ordinary use is unchanged
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mistral", "llama", "qwen2"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_ordinary_forward_unchanged(arch, padding):
    base = make_model(arch, seed=11)
    patched = apply_qstar_kernels(copy.deepcopy(base))
    B, L = 3, 12
    ids = torch.randint(2, VOCAB, (B, L), generator=torch.Generator().manual_seed(11))
    mask = torch.ones(B, L, dtype=torch.long)
    if padding == "left":
        mask[0, :4] = 0
        mask[2, :1] = 0
    elif padding == "right":
        mask[0, -4:] = 0
        mask[1, -1:] = 0
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
        got = patched(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(want).all()
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item():.3e}"


def test_training_step_unchanged():
    """Forward with labels, backward and an optimizer step: the same loss, gradients and weights."""
    base = make_model("mistral", seed=13, attention_dropout=0.0)
    patched = apply_qstar_kernels(copy.deepcopy(base))
    B, L = 2, 16
    ids = torch.randint(2, VOCAB, (B, L), generator=torch.Generator().manual_seed(13))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, -5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for model in (base, patched):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    assert torch.isfinite(losses[0]) and torch.equal(losses[1], losses[0])
    for (name, p), q in zip(patched.named_parameters(), base.parameters()):
        assert torch.equal(p.grad, q.grad), name
        assert torch.equal(p, q), name


@pytest.mark.parametrize("how", ["instance", "architecture"])
def test_generate_unchanged(how):
    """Greedy generation with a cache and left padding gives the same tokens and scores."""
    base = make_model("mistral", seed=17).eval()
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(17))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    gen = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    want = base.generate(input_ids=ids, attention_mask=mask, **gen)
    if how == "instance":
        model = apply_qstar_kernels(copy.deepcopy(base))
    else:
        apply_qstar_kernels_to_mistral()
        model = base
        assert is_patched(model)
    got = model.generate(input_ids=ids, attention_mask=mask, **gen)
    assert got.sequences.shape == (2, 15)
    assert torch.equal(got.sequences, want.sequences)
    for s_got, s_want in zip(got.scores, want.scores):
        assert torch.equal(s_got, s_want)


# --------------------------------------------------------------------------------------------
# Patching without an instance, and undoing patches
# --------------------------------------------------------------------------------------------


def test_patch_without_model_applies_to_models_created_afterwards():
    base = make_model("mistral", seed=19)
    keep = make_keep(3, 16)
    tokens = [torch.randint(2, VOCAB, (3, 16), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    with torch.no_grad():
        dense = rollout(base, tokens, keep, fused=False)

    assert apply_qstar_kernels_to_mistral() is None
    assert patched_model_types() == {"mistral"}
    later = make_model("mistral", seed=19)  # created after the call, default "sdpa"
    assert later.config._attn_implementation == "sdpa"  # nothing else changed
    assert is_patched(later)
    with torch.no_grad():
        fused = rollout(later, tokens, keep, fused=True)
    compare_rollouts(fused, dense, keep)

    # Other architectures are not patched by the Mistral call: a thought step on them fails loudly.
    llama = make_model("llama")
    assert not is_patched(llama)
    with pytest.raises(RuntimeError, match="not patched"), thought_step(keep, step=0):
        llama(input_ids=tokens[0])
    apply_qstar_kernels_to_llama()
    apply_qstar_kernels_to_qwen2()
    assert patched_model_types() == {"mistral", "llama", "qwen2"}
    with torch.no_grad(), thought_step(keep, step=0) as st:
        llama(input_ids=tokens[0])
    assert st.calls == 2


def test_revert_leaves_no_trace():
    attn_iface, mask_iface = _interfaces()
    keys_before = (set(attn_iface._global_mapping), set(mask_iface._global_mapping))
    model = make_model("mistral")
    keep = torch.ones(1, 8, dtype=torch.bool)
    ids = torch.randint(2, VOCAB, (1, 8))

    apply_qstar_kernels(model)
    apply_qstar_kernels_to_mistral()
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert (
        ATTN_IMPLEMENTATION in attn_iface._global_mapping
        and ATTN_IMPLEMENTATION in mask_iface._global_mapping
    )
    assert attn_iface._global_mapping["sdpa"] is not _ORIGINAL_SDPA[0]
    assert apply_qstar_kernels(model) is model  # idempotent

    revert_qstar_kernels()
    assert model.config._attn_implementation == "sdpa"
    assert (set(attn_iface._global_mapping), set(mask_iface._global_mapping)) == keys_before
    assert attn_iface._global_mapping["sdpa"] is _ORIGINAL_SDPA[0]
    assert mask_iface._global_mapping["sdpa"] is _ORIGINAL_SDPA[1]
    assert patched_model_types() == frozenset()
    assert not is_patched(model)
    assert not any("qstar" in name for name in vars(model)), "an attribute was left on the model"
    # Neither the reverted model nor a fresh one takes the fused path any more.
    for m in (model, make_model("mistral")):
        with pytest.raises(RuntimeError, match="no patched attention layer ran"), thought_step(keep):
            m(input_ids=ids)
    revert_qstar_kernels()  # a second revert is harmless


def test_revert_one_instance():
    a, b = make_model("mistral"), make_model("mistral", seed=1)
    apply_qstar_kernels(a)
    apply_qstar_kernels(b)
    revert_qstar_kernels(a)
    assert a.config._attn_implementation == "sdpa"
    assert b.config._attn_implementation == ATTN_IMPLEMENTATION


def test_instance_patch_of_an_eager_model_is_restored_to_eager():
    model = make_model("llama", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    apply_qstar_kernels(model)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    revert_qstar_kernels()
    assert model.config._attn_implementation == "eager"


# --------------------------------------------------------------------------------------------
# The dense-mask fallback
# --------------------------------------------------------------------------------------------


def test_dense_mask_fallback_warns_once_and_is_right():
    base = make_model("mistral", seed=23)
    patched = apply_qstar_kernels(copy.deepcopy(base))
    keep = make_keep(2, 12)
    tokens = [torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    with torch.no_grad():
        want = rollout(base, tokens, keep, fused=False)
        with pytest.warns(RuntimeWarning, match="dense 4-D attention_mask") as record:
            got = rollout(patched, tokens, keep, fused=False)
    assert sum("dense 4-D attention_mask" in str(r.message) for r in record) == 1, "warn once, not per layer"
    for (lg, _), (lw, _) in zip(got, want):
        assert torch.equal(lg, lw)


def test_masks_built_by_transformers_do_not_warn(recwarn):
    """Masks from transformers' own mask function (padding, cached continuation) are not the fallback."""
    from transformers import DynamicCache

    model = apply_qstar_kernels(make_model("mistral"))
    ids = torch.randint(2, VOCAB, (2, 8))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :3] = 0
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask[:, :8], use_cache=True, **{cache_keyword(model): cache})
        model(
            input_ids=ids, attention_mask=mask, use_cache=True, **{cache_keyword(model): cache}
        )  # (2, 1, 8, 16)
    assert not [w for w in recwarn if "dense 4-D" in str(w.message)]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["4.52.4", "4.40.0", "6.0.0", "7.1.0.dev0"])
def test_unsupported_transformers_version(monkeypatch, version):
    model = make_model("mistral")
    # Creating a model can swap the lazy module in sys.modules: patch the one an import returns.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    for call in (lambda: apply_qstar_kernels(model), lambda: apply_qstar_kernels_to_mistral()):
        with pytest.raises(UnsupportedTransformersError, match=rf"transformers>=4\.53,<6, found {version}"):
            call()
    assert model.config._attn_implementation == "sdpa"
    assert patched_model_types() == frozenset()


@pytest.mark.parametrize("version", ["4.53.0", "4.57.1", "5.0.0.dev0", "5.23.0"])
def test_supported_transformers_versions_pass_the_check(monkeypatch, version):
    from qstar_kernels.hf import check_transformers_version

    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    assert check_transformers_version() == version


def test_unsupported_models():
    with pytest.raises(TypeError, match="PreTrainedModel.*got Linear"):
        apply_qstar_kernels(torch.nn.Linear(2, 2))
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    )
    with pytest.raises(ValueError, match="BertModel"):
        apply_qstar_kernels(bert)
    with pytest.raises(ValueError, match=r"apply_qstar_kernels_to_mistral: expected .*'mistral'.*'llama'"):
        apply_qstar_kernels_to_mistral(make_model("llama"))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(key_padding_mask=torch.ones(2, 8)), TypeError, "key_padding_mask must be bool.*float32"),
        (
            dict(key_padding_mask=torch.ones(2, 1, 8, 8, dtype=torch.bool)),
            ValueError,
            r"2-D \(B, L\).*\(2, 1, 8, 8\)",
        ),
        (dict(key_padding_mask=[[1, 1]]), TypeError, "key_padding_mask must be a .*got list"),
        (dict(key_padding_mask=torch.ones(2, 0, dtype=torch.bool)), ValueError, "L >= 1"),
        (dict(step=-1), ValueError, "step must be >= 0"),
        (dict(step=True), TypeError, "step must be None or an int"),
        (dict(step=1.0), TypeError, "step must be None or an int"),
        (dict(step="1"), TypeError, "step must be None or an int"),
    ],
)
def test_thought_step_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match), thought_step(**kwargs):
        pass


def test_thought_steps_do_not_nest():
    with pytest.raises(RuntimeError, match="do not nest"), thought_step(), thought_step():
        pass


def test_thought_step_runtime_errors():
    from transformers import DynamicCache

    B, L = 2, 8
    model = apply_qstar_kernels(make_model("mistral"))
    pos = torch.arange(L).unsqueeze(0)
    keep = torch.ones(B, L, dtype=torch.bool)
    ids = torch.randint(2, VOCAB, (B, L))

    def cache_after_two_steps():
        # A fresh one for every check: a forward that fails in layer 1 has already grown layer 0's cache.
        cache = DynamicCache()
        with torch.no_grad():
            for a in range(2):
                with thought_step(step=a):
                    model(
                        input_ids=torch.randint(2, VOCAB, (B, L)),
                        position_ids=pos + a,
                        **{cache_keyword(model): cache},
                    )
        return cache

    def fwd(**kw):
        cache = {cache_keyword(model): cache_after_two_steps()}
        return dict(dict(input_ids=ids, position_ids=pos + 2, **cache), **kw)

    cases = [
        # (thought_step arguments, forward arguments, expected error)
        (
            dict(key_padding_mask=torch.ones(B, L + 1, dtype=torch.bool), step=2),
            fwd(),
            r"key_padding_mask=...\) has shape \(2, 9\).*\(B, L\) = \(2, 8\)",
        ),
        # The cache holds 2L keys before the forward, so this is step 2, not 3.
        (dict(key_padding_mask=keep, step=3), fwd(), r"sees 24 keys .* needs 32 = \(step 3 \+ 1\) x L"),
        (
            dict(key_padding_mask=keep, step=2),
            fwd(attention_mask=torch.ones(B, 3 * L)),
            "attention_mask=None",
        ),
        (
            dict(key_padding_mask=keep, step=2),
            fwd(attention_mask=build_additive_thought_mask(L, 2, keep)),
            "not both",
        ),
        (dict(key_padding_mask=keep, step=2), fwd(output_attentions=True), "output_attentions=True"),
        # Forgetting the cache: L keys where (a+1)L were expected.
        (
            dict(key_padding_mask=keep, step=2),
            dict(input_ids=ids, position_ids=pos + 2),
            "sees 8 keys .*past_key_values",
        ),
        # Not one token per text position.
        (
            dict(key_padding_mask=keep, step=2),
            fwd(input_ids=ids[:, :5], position_ids=pos[:, :5] + 2),
            "one new token per text position",
        ),
    ]
    with torch.no_grad():
        for step_kw, fwd_kw, match in cases:
            with pytest.raises(ValueError, match=match), thought_step(**step_kw):
                model(**fwd_kw)
        # The same forward, right, runs.
        kw = fwd()
        with thought_step(keep, step=2) as st:
            model(**kw)
        assert st.calls == 2


def test_thought_step_refuses_attention_dropout():
    model = apply_qstar_kernels(make_model("mistral", attention_dropout=0.1)).train()
    with pytest.raises(ValueError, match=r"attention dropout p=0\.1"), thought_step(step=0):
        model(input_ids=torch.randint(2, VOCAB, (1, 8)))
    model.eval()
    with torch.no_grad(), thought_step(step=0):  # eval mode: no dropout, fine
        model(input_ids=torch.randint(2, VOCAB, (1, 8)))


def test_thought_step_on_unpatched_model_raises():
    model = make_model("mistral")
    with pytest.raises(RuntimeError, match="no patched attention layer ran"), thought_step(step=0):
        model(input_ids=torch.randint(2, VOCAB, (1, 8)))


def test_sliding_window_cache_that_drops_keys_is_caught():
    """transformers 5.x gives a windowed config a cache that keeps only the last W keys per layer; a
    thought step notices the missing keys instead of attending to a wrong set. (4.53's cache keeps
    every key, and the same loop then runs through.)"""
    B, L, W = 1, 8, 10
    model = apply_qstar_kernels(make_model("mistral", sliding_window=W))
    pos = torch.arange(L).unsqueeze(0)
    with torch.no_grad():
        with thought_step(step=0):
            cache = model(input_ids=torch.randint(2, VOCAB, (B, L)), position_ids=pos, use_cache=True)
            cache = cache["cache"] if "cache" in cache else cache["past_key_values"]  # the name by version
        drops_keys = any(getattr(cache, "is_sliding", []))

        def more_steps():
            for a in range(1, 4):
                with thought_step(step=a):
                    model(
                        input_ids=torch.randint(2, VOCAB, (B, L)),
                        position_ids=pos + a,
                        **{cache_keyword(model): cache},
                    )

        if drops_keys:
            with pytest.raises(ValueError, match=r"DynamicCache\(\) instead"):
                more_steps()
        else:
            more_steps()
            assert cache.get_seq_length() == 4 * L


# --------------------------------------------------------------------------------------------
# Packaging and the example
# --------------------------------------------------------------------------------------------


def test_pyproject_names_the_supported_range():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert extras["hf"] == [f"transformers{SUPPORTED_RANGE}"]
    assert any("hf" in dep for dep in extras["dev"]), "CI installs .[dev], which must bring transformers"


def test_example_runs():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "hf_mistral_thought_rollout.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max relative difference" in proc.stdout and "OK" in proc.stdout, proc.stdout
