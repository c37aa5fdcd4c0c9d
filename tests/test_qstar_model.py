"""QuietStarForCausalLM: construction, rollout invariants, checkpointing, save/load, conversion, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import random_thoughts, text_batch, tiny_lm, tiny_mistral, tiny_quietstar, tiny_tokenizer

from qstar import QuietStarConfig, QuietStarForCausalLM, get_preset

CFG = dict(n_thought_tokens=3, n_talk_tokens=2, n_rationales=2)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_from_base_adds_meta_tokens_and_initialises_embeddings():
    tok = tiny_tokenizer()
    base = tiny_mistral(len(tok))
    v0 = base.get_input_embeddings().weight.shape[0]
    model = QuietStarForCausalLM.from_base(base, tok, QuietStarConfig(**CFG))
    assert (model.start_id, model.end_id) == (v0, v0 + 1)
    assert model.vocab_size == v0 + 2 == len(tok)
    assert tok.convert_ids_to_tokens([model.start_id, model.end_id]) == ["<|startthought|>", "<|endthought|>"]
    hyphen = tok.encode("---", add_special_tokens=False)[0]
    E = base.get_input_embeddings().weight
    torch.testing.assert_close(model.start_embedding[0] * 100, E[hyphen], rtol=1e-6, atol=0)
    torch.testing.assert_close(model.end_embedding[0], model.start_embedding[0], rtol=0, atol=0)
    assert float(model.mixing_head[-1].weight.detach().abs().sum()) == 0.0  # the authors' zero init: w = 0
    assert base.config._attn_implementation == "qstar_sdpa"  # patched


def test_zero_mixing_head_gives_zero_rewards_and_base_predictions():
    model = tiny_quietstar(QuietStarConfig(**CFG), nonzero_head=False).train()
    ids, mask = text_batch(2, 14, pad_last=3)
    out = model(ids, mask)
    assert float(out.mixing_weights.abs().max()) == 0.0
    assert float(out.rewards.abs().max()) < 1e-5
    assert float(out.advantages.abs().max()) < 1e-5
    # with w = 0, talk step 0 predicts x_{j+1} from the base state: the base NLL.
    torch.testing.assert_close(out.talk_nll[0], out.base_nll, rtol=1e-6, atol=1e-7)


def test_output_shapes_and_loss_composition():
    cfg = QuietStarConfig(**CFG, policy_loss_weight=10.0)
    model = tiny_quietstar(cfg).train()
    B, L = 2, 15
    ids, mask = text_batch(B, L, pad_last=4)
    out = model(ids, mask, generator=torch.Generator().manual_seed(0))
    R, K, n = B * cfg.n_rationales, cfg.n_talk_tokens, cfg.n_thought_tokens
    assert out.talk_nll.shape == (K,)
    assert out.rewards.shape == out.advantages.shape == (R, L - K - 1)
    assert out.mixing_weights.shape == (K, R, L)
    assert out.thought_tokens.shape == out.thought_logprobs.shape == (n, R, L)
    want = 0.5 * out.base_nll + 0.5 * out.talk_nll.mean() + 10.0 * out.policy_loss
    torch.testing.assert_close(out.loss, want)
    assert bool((out.advantages >= 0).all())
    # the baseline: the mean over a sequence's two rationales; clipped advantage = max(r - mean, 0).
    r = out.rewards.view(B, 2, -1)
    torch.testing.assert_close(out.advantages.view(B, 2, -1), (r - r.mean(1, keepdim=True)).clamp_min(0))
    assert float(out.advantages.abs().max()) > 0  # a non-zero head gives non-trivial rewards
    meta = (out.thought_tokens == model.start_id) | (out.thought_tokens == model.end_id)
    assert not bool(meta.any())
    assert bool((out.thought_logprobs <= 0).all())


def test_per_token_outputs_logits_and_hidden_states_agree():
    """base_logprobs / talk_logprobs are the per-token terms of the NLLs; the optional logits and
    hidden states give the same log-probabilities (the logits are the mix of the hidden states)."""
    cfg = QuietStarConfig(**CFG, nll_normalization="tokens")
    model = tiny_quietstar(cfg).eval()
    B, L = 2, 13
    ids, mask = text_batch(B, L, pad_last=3)
    with torch.no_grad():
        out = model(ids, mask, output_logits=True, output_hidden_states=True)
        plain = model(ids, mask)
    assert plain.logits is None and plain.base_hidden is None and plain.mixed_hidden is None
    V, H = model.vocab_size, model.hidden_size
    assert out.logits.shape == (B, L, V) and out.logits.dtype == torch.float32
    assert out.base_hidden.shape == out.mixed_hidden.shape == (B, L, H)
    assert out.base_logprobs.shape == (B, L) and out.talk_logprobs.shape == (1, B, L)
    valid = torch.zeros(B, L, dtype=torch.bool)
    valid[:, :-1] = mask[:, 1:].bool()
    assert bool((out.base_logprobs[~valid] == 0).all()) and bool((out.talk_logprobs[0][~valid] == 0).all())
    torch.testing.assert_close(-out.base_logprobs.sum() / valid.sum(), out.base_nll)
    torch.testing.assert_close(-out.talk_logprobs[0].sum() / valid.sum(), out.talk_nll[0])
    tgt = torch.zeros(B, L, dtype=torch.long)
    tgt[:, :-1] = ids[:, 1:]
    from_logits = torch.log_softmax(out.logits, -1).gather(-1, tgt[..., None])[..., 0]
    torch.testing.assert_close(from_logits[valid], out.talk_logprobs[0][valid], rtol=1e-5, atol=1e-5)
    W = model.base_model.get_output_embeddings().weight
    base_lp = torch.log_softmax(out.base_hidden @ W.T, -1).gather(-1, tgt[..., None])[..., 0]
    torch.testing.assert_close(base_lp[valid], out.base_logprobs[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mixed_hidden @ W.T, out.logits, rtol=1e-5, atol=1e-5)
    # the mix is not the base: the non-zero head moves the logits
    assert float((out.logits - out.base_hidden @ W.T).abs().max()) > 1e-3


def _labelled(model, ids, mask, thoughts, labels=None):
    out = model(ids, mask, labels=labels, thought_tokens=thoughts)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    return out, _grads(model)


PER_TOKEN = ("loss", "base_nll", "talk_nll", "policy_loss", "rewards", "advantages", "base_logprobs")


def test_labels_none_equals_input_ids_with_padding_ignored():
    """The default labels are input_ids with -100 where attention_mask is 0: bit for bit, and a label
    at a padded position is ignored whatever its value."""
    model = tiny_quietstar(QuietStarConfig(**CFG)).train()
    ids, mask = text_batch(2, 14, pad_last=3)
    thoughts = random_thoughts(model, 4, 14)
    want, want_g = _labelled(model, ids, mask, thoughts)
    for labels in (ids.masked_fill(mask == 0, -100), ids.clone(), ids.int()):
        got, got_g = _labelled(model, ids, mask, thoughts, labels)
        for name in (*PER_TOKEN, "talk_logprobs"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert all(torch.equal(got_g[n], want_g[n]) for n in want_g)


def test_an_ignored_label_removes_exactly_that_tokens_terms():
    """labels[b, k] = -100 on a real token: base_logprobs[., k-1] and talk_logprobs[s][., k-1-s] become
    0, every other per-token term is unchanged, the NLLs lose exactly those terms from their sums and
    counts, and the rewards lose exactly those talk-minus-base terms."""
    cfg = QuietStarConfig(**CFG, nll_normalization="tokens")
    model = tiny_quietstar(cfg).train()
    B, L, K, P = 2, 14, cfg.n_talk_tokens, cfg.n_rationales
    ids, mask = text_batch(B, L, pad_last=3)
    thoughts = random_thoughts(model, B * P, L)
    with torch.no_grad():
        full = model(ids, mask, thought_tokens=thoughts)
        k = 6
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, k] = -100
        out = model(ids, mask, labels=labels, thought_tokens=thoughts)
    rows = slice(0, P)  # the P rationale rows of sequence 0
    base = full.base_logprobs.clone()
    base[rows, k - 1] = 0
    talk = full.talk_logprobs.clone()
    for s in range(K):
        talk[s, rows, k - 1 - s] = 0
    assert float(full.base_logprobs[rows, k - 1].abs().min()) > 0  # it was a real term
    assert torch.equal(out.base_logprobs, base) and torch.equal(out.talk_logprobs, talk)
    valid = torch.zeros(B, L, dtype=torch.bool)
    valid[:, :-1] = mask[:, 1:].bool()
    n_base = int(valid.sum()) * P - P
    torch.testing.assert_close(out.base_nll, -base.sum() / n_base, rtol=1e-6, atol=0)
    for s in range(K):
        n_talk = int(valid[:, s:].sum()) * P - P
        torch.testing.assert_close(out.talk_nll[s], -talk[s].sum() / n_talk, rtol=1e-6, atol=0)
    n = L - K - 1
    rewards = sum(talk[s, :, :n] - base[:, s : s + n] for s in range(K))
    torch.testing.assert_close(out.rewards, rewards, rtol=1e-6, atol=1e-6)
    changed = (out.rewards != full.rewards).nonzero()[:, 1].unique().tolist()
    assert changed == [k - 1 - s for s in reversed(range(K))]  # only the positions whose window held k


def test_a_label_equal_to_the_pad_id_the_paper_quirk():
    """A real token equal to the pad id (the authors' EOS) inside the text: predicted by default, ignored
    with ignore_pad_labels (the paper preset), which equals a -100 label at that position."""
    assert get_preset("paper").method.ignore_pad_labels and not get_preset("default").method.ignore_pad_labels
    model = tiny_quietstar(QuietStarConfig(**CFG)).train()
    ids, mask = text_batch(2, 14, pad_last=3)
    k = 5
    ids[0, k] = model.pad_token_id  # mask stays 1: a real EOS-like token
    thoughts = random_thoughts(model, 4, 14)
    predicted = model(ids, mask, thought_tokens=thoughts)
    assert float(predicted.base_logprobs[0, k - 1]) < 0
    model.config.ignore_pad_labels = True
    quirk = model(ids, mask, thought_tokens=thoughts)
    assert float(quirk.base_logprobs[0, k - 1]) == 0.0 and float(quirk.talk_logprobs[0, 0, k - 1]) == 0.0
    model.config.ignore_pad_labels = False
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, k] = -100
    chosen = model(ids, mask, labels=labels, thought_tokens=thoughts)
    for name in (*PER_TOKEN, "talk_logprobs"):
        assert torch.equal(getattr(chosen, name), getattr(quirk, name)), name


@pytest.mark.parametrize(
    "labels, error, match",
    [
        (
            torch.zeros(2, 11, dtype=torch.long),
            ValueError,
            r"labels must be a tensor with the shape of input_ids \(2, 12\)",
        ),
        ([[0] * 12] * 2, ValueError, "labels must be a tensor"),
        (torch.zeros(2, 12), TypeError, "labels must be an integer tensor"),
        (torch.zeros(2, 12, dtype=torch.bool), TypeError, "labels must be an integer tensor"),
        (
            torch.full((2, 12), 104),
            ValueError,
            r"labels must be ids in \[0, 104\) or -100 \(ignored\), got 104 at \(0, 0\)",
        ),
        (
            torch.full((2, 12), -1),
            ValueError,
            r"labels must be ids in \[0, 104\) or -100 \(ignored\), got -1",
        ),
    ],
)
def test_bad_labels_raise_clearly(labels, error, match):
    model = tiny_quietstar(QuietStarConfig(**CFG)).train()
    ids, mask = text_batch(2, 12)
    with pytest.raises(error, match=match):
        model(ids, mask, labels=labels)


def test_sampling_is_reproducible_with_a_generator():
    model = tiny_quietstar(QuietStarConfig(**CFG)).train()
    ids, mask = text_batch(2, 12)
    a = model(ids, mask, generator=torch.Generator().manual_seed(3))
    b = model(ids, mask, generator=torch.Generator().manual_seed(3))
    c = model(ids, mask, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.thought_tokens, b.thought_tokens)
    assert torch.equal(a.loss, b.loss)
    assert not torch.equal(a.thought_tokens, c.thought_tokens)


def test_each_position_sees_only_its_own_thought():
    """Change the injected thought of one position: only that position's reward may change."""
    model = tiny_quietstar(QuietStarConfig(**CFG)).train()
    B, L = 2, 14
    ids, mask = text_batch(B, L, pad_last=2)
    thoughts = random_thoughts(model, B * 2, L)
    other = thoughts.clone()
    j = 5
    other[:, 1, j] = (other[:, 1, j] - 3 + 7) % (model.start_id - 3) + 3
    with torch.no_grad():
        a = model(ids, mask, thought_tokens=thoughts)
        b = model(ids, mask, thought_tokens=other)
    diff = (a.rewards - b.rewards).abs()
    assert float(diff[1, j]) > 1e-6
    diff[1, j] = 0
    assert float(diff.max()) == 0.0
    assert torch.equal(a.base_nll, b.base_nll)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = tiny_quietstar(QuietStarConfig(**CFG)).train()
    ids, mask = text_batch(2, 13, pad_last=3)
    thoughts = random_thoughts(model, 4, 13)
    out = model(ids, mask, thought_tokens=thoughts)
    out.loss.backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    model.config.gradient_checkpointing = True
    out2 = model(ids, mask, thought_tokens=thoughts)
    out2.loss.backward()
    got = _grads(model)
    assert torch.equal(out.loss, out2.loss)
    assert set(ref) == set(got)
    for name in ref:
        assert _rel(got[name], ref[name]) < 1e-5, name


def test_gradient_checkpointing_keeps_less_in_memory():
    """Saved activations: with step-level checkpointing the graph holds fewer bytes."""
    cfg = QuietStarConfig(n_thought_tokens=4, n_talk_tokens=2, n_rationales=2)
    model = tiny_quietstar(cfg, hidden=64).train()
    ids, mask = text_batch(2, 32)
    thoughts = random_thoughts(model, 4, 32)

    def saved_bytes():
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, mask, thought_tokens=thoughts)
        return total

    plain = saved_bytes()
    model.config.gradient_checkpointing = True
    ckpt = saved_bytes()
    assert ckpt < 0.5 * plain, (ckpt, plain)


def test_policy_gradient_reaches_thought_path_but_not_the_mixing_head():
    model = tiny_quietstar(QuietStarConfig(**CFG)).train()
    ids, mask = text_batch(2, 12)
    out = model(ids, mask, thought_tokens=random_thoughts(model, 4, 12))
    assert float(out.advantages.max()) > 0
    out.policy_loss.backward()
    head = [p.grad for p in model.mixing_head.parameters()]
    assert all(g is None or float(g.abs().max()) == 0 for g in head)
    assert float(model.start_embedding.grad[0].abs().max()) > 0
    assert float(model.base_model.get_output_embeddings().weight.grad.abs().max()) > 0
    # <end> feeds no sampled token: the policy term gives it no gradient.
    assert model.end_embedding.grad is None or float(model.end_embedding.grad.abs().max()) == 0


def test_talk_loss_trains_the_mixing_head_and_meta_embeddings():
    model = tiny_quietstar(QuietStarConfig(**CFG)).train()
    ids, mask = text_batch(2, 12)
    out = model(ids, mask, thought_tokens=random_thoughts(model, 4, 12))
    out.talk_nll.mean().backward()
    for p in model.mixing_head.parameters():
        assert float(p.grad.abs().max()) > 0
    assert float(model.end_embedding.grad[0].abs().max()) > 0
    assert float(model.start_embedding.grad[0].abs().max()) > 0
    assert float(model.start_embedding.grad[1].abs().max()) == 0  # the unused log-std row


def test_one_hot_lookup_equals_gather_and_normalisations_differ_only_in_the_mean():
    ids, mask = text_batch(2, 12, pad_last=3)
    gather = tiny_quietstar(QuietStarConfig(**CFG, embedding_lookup="gather")).train()
    one_hot = copy.deepcopy(gather)
    one_hot.config.embedding_lookup = "one_hot"
    thoughts = random_thoughts(gather, 4, 12)
    a = gather(ids, mask, thought_tokens=thoughts)
    b = one_hot(ids, mask, thought_tokens=thoughts)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.rewards, b.rewards, rtol=1e-5, atol=1e-6)
    gather.config.nll_normalization = "nonzero"
    c = gather(ids, mask, thought_tokens=thoughts)
    # in fp32 no real token's loss is exactly 0, so both counts are the real targets.
    torch.testing.assert_close(a.base_nll, c.base_nll, rtol=1e-6, atol=0)


def test_eval_mode_uses_the_eval_overrides_and_greedy_thoughts():
    cfg = QuietStarConfig(**CFG, eval_thought_temperature=0.0)
    model = tiny_quietstar(cfg).eval()
    ids, mask = text_batch(2, 12)
    with torch.no_grad():
        a = model(ids, mask, generator=torch.Generator().manual_seed(0))
        b = model(ids, mask, generator=torch.Generator().manual_seed(1))
    assert a.talk_nll.shape == (1,)  # eval_n_talk_tokens
    assert a.thought_tokens.shape == (3, 2, 12)  # eval_n_rationales = 1
    assert torch.equal(a.thought_tokens, b.thought_tokens)  # greedy: the seed does not matter
    # one rationale: no baseline (the authors subtract the mean only for P > 1), A = max(r, 0)
    torch.testing.assert_close(a.advantages, a.rewards.clamp_min(0), rtol=0, atol=0)
    model.config.eval_thought_temperature = 1.0  # the authors' eval: sampled thoughts
    with torch.no_grad():
        c = model(ids, mask, generator=torch.Generator().manual_seed(0))
        d = model(ids, mask, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(c.thought_tokens, d.thought_tokens)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_quietstar(QuietStarConfig(**CFG, policy_loss_weight=3.0)).train()
    with torch.no_grad():  # trained-looking meta embeddings, distinct from the init
        model.start_embedding.add_(0.01)
        model.end_embedding.sub_(0.02)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = QuietStarForCausalLM.from_pretrained(tmp_path / "ckpt").train()
    assert loaded.config == model.config
    assert (loaded.start_id, loaded.end_id, loaded.pad_token_id) == (model.start_id, model.end_id, 0)  # <pad>
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert set(sd_a) == set(sd_b)
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    assert loaded.tokenizer.convert_tokens_to_ids("<|startthought|>") == model.start_id
    ids, mask = text_batch(2, 12)
    thoughts = random_thoughts(model, 4, 12)
    assert torch.equal(
        model(ids, mask, thought_tokens=thoughts).loss, loaded(ids, mask, thought_tokens=thoughts).loss
    )
    with pytest.raises(FileNotFoundError, match="quietstar_config.json"):
        QuietStarForCausalLM.from_pretrained(tmp_path)


def _write_authors_checkpoint(model: QuietStarForCausalLM, path):
    """The authors' released layout: Mistral weights plus start/end_embedding and talk_head.0.*."""
    from safetensors.torch import save_file

    path.mkdir()
    model.base_model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update({"n_ahead": 6, "use_complex_talk_head": True, "use_concat_talk_head": True, "max_thoughts": 7})
    cfg.pop("_attn_implementation", None)
    (path / "config.json").write_text(json.dumps(cfg))
    state = {k: v.detach().clone().contiguous() for k, v in model.base_model.state_dict().items()}
    state["start_embedding"] = model.start_embedding.detach().clone()
    state["end_embedding"] = model.end_embedding.detach().clone()
    for k, v in model.mixing_head.state_dict().items():
        state[f"talk_head.0.{k}"] = v.clone()
    save_file(state, str(path / "model.safetensors"))


def test_from_authors_checkpoint_keeps_the_trained_meta_embeddings(tmp_path):
    model = tiny_quietstar(QuietStarConfig(**CFG)).train()
    with torch.no_grad():
        model.start_embedding.mul_(1.5)
        model.end_embedding.add_(0.03)
    _write_authors_checkpoint(model, tmp_path / "authors")
    loaded = QuietStarForCausalLM.from_authors_checkpoint(tmp_path / "authors", config=model.config).train()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ids, mask = text_batch(2, 12)
    thoughts = random_thoughts(model, 4, 12)
    assert torch.equal(
        model(ids, mask, thought_tokens=thoughts).loss, loaded(ids, mask, thought_tokens=thoughts).loss
    )
    # without a config, the thought length comes from the authors' n_ahead (6 -> 3 sampled tokens)
    inferred = QuietStarForCausalLM.from_authors_checkpoint(tmp_path / "authors")
    assert inferred.config.n_thought_tokens == 3
    # the base model's tokenizer (no meta tokens): they are added, as the last two ids
    plain_tok = tiny_tokenizer()
    with_base_tok = QuietStarForCausalLM.from_authors_checkpoint(tmp_path / "authors", tokenizer=plain_tok)
    assert (with_base_tok.start_id, with_base_tok.end_id) == (model.start_id, model.end_id)
    assert plain_tok.convert_ids_to_tokens([model.start_id]) == ["<|startthought|>"]
    with pytest.raises(ValueError, match="not the authors' Quiet-STaR layout"):
        model.base_model.save_pretrained(tmp_path / "plain")
        QuietStarForCausalLM.from_authors_checkpoint(tmp_path / "plain")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(thought_tokens=torch.zeros(2, 4, 12, dtype=torch.long)), "thought_tokens must have shape"),
        (
            dict(thought_tokens=torch.full((3, 4, 12), 102, dtype=torch.long)),  # <|startthought|>
            "must not contain the meta tokens",
        ),
        (dict(attention_mask=torch.ones(2, 11)), "attention_mask must have the shape"),
    ],
)
def test_bad_inputs_raise_clearly(kwargs, match):
    model = tiny_quietstar(QuietStarConfig(**CFG)).train()
    ids, mask = text_batch(2, 12)
    kwargs.setdefault("attention_mask", mask)
    with pytest.raises(ValueError, match=match):
        model(ids, **kwargs)


def test_bad_lengths_ids_and_configs_raise_clearly():
    model = tiny_quietstar(QuietStarConfig(**CFG)).train()
    with pytest.raises(ValueError, match="at least n_talk_tokens \\+ 2"):
        model(torch.randint(3, 20, (2, 3)))
    with pytest.raises(ValueError, match="input_ids must be ids in"):
        model(torch.full((2, 8), model.vocab_size))
    with pytest.raises(ValueError, match="input_ids must be a \\(B, L\\) tensor"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="n_rationales must be > 0"):
        QuietStarConfig(n_rationales=0)
    with pytest.raises(ValueError, match="nll_normalization must be one of"):
        QuietStarConfig(nll_normalization="mean")
    with pytest.raises(ValueError, match="preset must be one of"):
        get_preset("large")


def test_transformers_gradient_checkpointing_is_refused():
    tok = tiny_tokenizer()
    base = tiny_mistral(len(tok))
    # transformers 5.x renamed it (the old name warns); 4.53 has only gradient_checkpointing_enable
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable()
    with pytest.raises(ValueError, match="QuietStarConfig.gradient_checkpointing"):
        QuietStarForCausalLM.from_base(base, tok, QuietStarConfig(**CFG))


def test_bf16_model_runs_and_is_finite():
    model = tiny_quietstar(QuietStarConfig(**CFG), dtype=torch.bfloat16).train()
    ids, mask = text_batch(2, 12, pad_last=2)
    out = model(ids, mask, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_presets_differ_as_documented():
    paper, default = get_preset("paper"), get_preset("default")
    assert paper.method.n_ahead == 12 and paper.method.n_steps == 15
    assert (paper.method.nll_normalization, paper.method.embedding_lookup) == ("nonzero", "one_hot")
    assert paper.method.ignore_pad_labels and not default.method.ignore_pad_labels
    assert paper.method.eval_thought_temperature == 1.0 and default.method.eval_thought_temperature == 0.0
    assert paper.training.precision == "bf16" and default.training.precision == "bf16-mixed"
    assert (paper.training.learning_rate, paper.method.policy_loss_weight) == (1e-6, 1e6)
    assert len(default.differences) >= 4 and not paper.differences
    tiny = get_preset("tiny-demo")
    assert tiny.training.precision == "fp32"
    assert QuietStarConfig.from_dict(tiny.method.to_dict()) == tiny.method


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_other_architectures_wrap_and_keep_thoughts_private(arch):
    """from_base works on any causal LM the patch supports: Llama and Qwen2 here."""
    tok = tiny_tokenizer()
    base = tiny_lm(len(tok), arch=arch)
    model = QuietStarForCausalLM.from_base(base, tok, QuietStarConfig(**CFG)).train()
    with torch.no_grad():
        model.mixing_head[-1].weight.normal_(0, 0.5)
    ids, mask = text_batch(2, 12, pad_last=2)
    thoughts = random_thoughts(model, 4, 12)
    other = thoughts.clone()
    other[:, 0, 4] = (other[:, 0, 4] - 3 + 5) % (model.start_id - 3) + 3
    with torch.no_grad():
        a = model(ids, mask, thought_tokens=thoughts)
        b = model(ids, mask, thought_tokens=other)
    diff = (a.rewards - b.rewards).abs()
    assert float(diff[0, 4]) > 0
    diff[0, 4] = 0
    assert float(diff.max()) == 0.0
    out = model(ids, mask, thought_tokens=thoughts)
    out.loss.backward()
    assert torch.isfinite(out.loss)
