"""Generation with thoughts (``qstar.generate``): equal to the training forward, and a usable API.

The central test: at every generated position, the logits that generation sampled from equal the
logits that the eval-mode training forward gives for the same text and the same (injected) thought.
Generation runs a KV cache with a private branch per thought; the forward runs the parallel
rollout with ``thought_attention``. They share no attention code, so agreement in float64 to
1e-10 checks the whole decode path: positions, the branch and its removal, left padding, the
fused ``[x, <start>]`` and ``[t_n, <end>]`` calls, and the mix.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_mistral, tiny_tokenizer

import qstar
from qstar import QuietStarConfig, QuietStarForCausalLM
from qstar.generation import _filter_logits
from qstar_kernels.hf import cache_keyword


def make_model(n_thought=3, *, dtype=torch.float64, seed=0, layers=2, sliding_window=None, lookup="gather"):
    tok = tiny_tokenizer()
    base = tiny_mistral(len(tok), seed=seed, layers=layers, dtype=dtype)
    base.config.sliding_window = sliding_window
    cfg = QuietStarConfig(
        n_thought_tokens=n_thought, n_talk_tokens=2, n_rationales=2, eval_thought_temperature=1.0
    )
    model = QuietStarForCausalLM.from_base(base, tok, cfg)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        last = model.mixing_head[-1].weight
        last.copy_(torch.randn(last.shape, generator=gen, dtype=torch.float64).to(dtype) * 0.5)
    return model.eval()


def forward_logits_for(model, out, b: int):
    """The eval forward's logits at the positions that produced row b's generated tokens, with the
    generation's thoughts injected there (other positions: an arbitrary fixed thought)."""
    P = out.prompt_length
    row = out.sequences[b]
    n_new = out.lengths[b]
    real = row[:P] != model.pad_token_id
    prompt = row[:P][real]
    seq = torch.cat([prompt, out.new_tokens[b, :n_new]])
    L = seq.numel()
    n = model.config.n_thought_tokens
    thoughts = torch.full((n, 1, L), 7, dtype=torch.int64)
    first = prompt.numel() - 1  # the position that predicts the first new token
    thoughts[:, 0, first : first + n_new] = out.thoughts[b, :n_new].T
    with torch.no_grad():
        fo = model(seq[None], thought_tokens=thoughts, output_logits=True)
    return fo.logits[0, first : first + n_new], out.logits[b, :n_new]


@pytest.mark.parametrize("n_thought, lookup", [(1, "gather"), (3, "gather"), (3, "one_hot")])
def test_generation_logits_equal_the_training_forward_float64(n_thought, lookup):
    model = make_model(n_thought, lookup=lookup)
    prompts = ["Q: 12+30=", "7*8=", "hello there, "]  # different lengths: left padding in the batch
    out = model.generate(
        prompts,
        max_new_tokens=7,
        temperature=1.0,
        return_thoughts=True,
        output_logits=True,
        eos_token_id=None,
        generator=torch.Generator().manual_seed(3),
    )
    assert out.thoughts.shape == (3, 7, n_thought)
    for b in range(3):
        ref, got = forward_logits_for(model, out, b)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    # The thoughts were sampled (temperature 1), not all alike: the test would catch a mixed-up step.
    assert out.thoughts.unique().numel() > 3


def test_generation_logits_equal_the_training_forward_float32():
    model = make_model(3, dtype=torch.float32, seed=4)
    out = model.generate(
        ["(1+2)*3=", "abc"],
        max_new_tokens=6,
        return_thoughts=True,
        output_logits=True,
        eos_token_id=None,
        generator=torch.Generator().manual_seed(0),
    )
    for b in range(2):
        ref, got = forward_logits_for(model, out, b)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)


def test_think_false_is_the_base_model():
    model = make_model(2)
    base = model.base_model
    ids = torch.tensor([model.tokenizer.encode("Q: 3+4=")])
    out = model.generate(
        ids, max_new_tokens=6, think=False, temperature=0, output_logits=True, eos_token_id=None
    )
    assert out.thoughts is None and out.mixing_weights is None
    with torch.no_grad():
        ref = base(out.sequences).logits[0, ids.shape[1] - 1 : -1]
        # generate never samples the meta tokens; HF's generate must be told so
        banned = [model.start_id, model.end_id]
        hf = base.generate(
            ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0, suppress_tokens=banned
        )
    torch.testing.assert_close(out.logits[0], ref, rtol=0, atol=1e-10)
    assert torch.equal(out.sequences, hf)


def test_batched_prompts_equal_single_prompts():
    model = make_model(3)
    prompts = ["Q: 9-4=", "2+2=", "xyz 10 "]
    kw = dict(max_new_tokens=6, temperature=0, thought_temperature=0, return_thoughts=True, eos_token_id=None)
    batched = model.generate(prompts, **kw)
    for b, p in enumerate(prompts):
        single = model.generate(p, **kw)
        assert torch.equal(batched.new_tokens[b], single.new_tokens[0])
        assert torch.equal(batched.thoughts[b], single.thoughts[0])
        assert batched.texts[b] == single.texts[0]


def test_right_padded_ids_are_left_aligned():
    model = make_model(2)
    tok = model.tokenizer
    a, b = tok.encode("12+3="), tok.encode("7=")
    P = len(a)
    right = torch.zeros(2, P, dtype=torch.int64)
    right[0] = torch.tensor(a)
    right[1, : len(b)] = torch.tensor(b)
    mask = torch.zeros(2, P, dtype=torch.long)
    mask[0] = 1
    mask[1, : len(b)] = 1
    left_ids = torch.zeros_like(right)
    left_ids[0] = right[0]
    left_ids[1, P - len(b) :] = torch.tensor(b)
    left_mask = (left_ids != 0).long()  # 0 is the pad id; the prompts hold no 0
    kw = dict(max_new_tokens=4, temperature=0, thought_temperature=0, eos_token_id=None)
    r = model.generate(right, mask, **kw)
    l_ = model.generate(left_ids, left_mask, **kw)
    assert torch.equal(r.new_tokens, l_.new_tokens)
    assert torch.equal(r.sequences, l_.sequences)


def test_meta_tokens_are_never_emitted():
    model = make_model(3)
    with torch.no_grad():  # make the meta tokens by far the likeliest next tokens everywhere
        W = model.base_model.get_output_embeddings().weight
        W[model.start_id] = 50 * model.base_model.model.norm.weight
        W[model.end_id] = 50 * model.base_model.model.norm.weight
    out = model.generate(
        ["1+1=", "ab"],
        max_new_tokens=8,
        return_thoughts=True,
        output_logits=True,
        eos_token_id=None,
        generator=torch.Generator().manual_seed(0),
    )
    meta = (model.start_id, model.end_id)
    top = out.logits.argmax(-1)
    assert bool(((top == meta[0]) | (top == meta[1])).float().mean() > 0.5)  # the ban is doing work
    for t in meta:
        assert not bool((out.new_tokens == t).any())
        assert not bool((out.thoughts == t).any())


def test_stop_strings_and_eos_finish_rows():
    model = make_model(2)
    kw = dict(max_new_tokens=10, temperature=0, thought_temperature=0, eos_token_id=None)
    free = model.generate(["Q: 5+5=", "hi"], **kw)
    text0 = free.texts[0]
    stop = text0[3:5]  # a stop string the first row will produce, ending at character 5
    first_hit = text0.find(stop)
    out = model.generate(["Q: 5+5=", "hi"], stop_strings=[stop], **kw)
    assert out.finish_reasons[0] == "stop"
    assert out.texts[0] == text0[: first_hit + len(stop)]
    assert out.lengths[0] == first_hit + len(stop)  # one character per token with this tokenizer
    assert bool((out.new_tokens[0, out.lengths[0] :] == model.pad_token_id).all())
    # the other row runs on unaffected: it stops only at its own first occurrence, if any
    hit1 = free.texts[1].find(stop)
    if hit1 < 0:
        assert out.finish_reasons[1] == "length" and out.texts[1] == free.texts[1]
    else:
        assert out.finish_reasons[1] == "stop" and out.texts[1] == free.texts[1][: hit1 + len(stop)]
    # EOS: declare the second row's 3rd token an EOS id
    eos = int(free.new_tokens[1, 2])
    out = model.generate(["Q: 5+5=", "hi"], **{**kw, "eos_token_id": eos})
    assert out.finish_reasons[1] == "eos" and out.lengths[1] <= 3
    assert int(out.new_tokens[1, out.lengths[1] - 1]) == eos


def test_streaming_matches_generate():
    model = make_model(2)
    kw = dict(max_new_tokens=6, eos_token_id=None)
    full = model.generate(
        ["3*3=", "ok "], return_thoughts=True, generator=torch.Generator().manual_seed(5), **kw
    )
    steps = list(qstar.stream(model, ["3*3=", "ok "], generator=torch.Generator().manual_seed(5), **kw))
    assert [s.index for s in steps] == list(range(6))
    assert torch.equal(torch.stack([s.tokens for s in steps], 1), full.new_tokens)
    assert torch.equal(torch.stack([s.thoughts for s in steps], 1), full.thoughts)
    assert ["".join(s.texts[b] for s in steps) for b in range(2)] == full.texts
    assert [s.thought_texts[0] for s in steps] == full.thought_texts[0]
    seen = []
    again = model.generate(
        ["3*3=", "ok "], streamer=seen.append, generator=torch.Generator().manual_seed(5), **kw
    )
    assert len(seen) == 6 and torch.equal(again.new_tokens, full.new_tokens)
    assert steps[-1].finished.all() and steps[-1].finish_reasons == ["length", "length"]


def test_hf_text_streamer(capsys):
    from transformers import TextStreamer

    model = make_model(2)
    out = model.generate(
        "Q: 1+2=",
        max_new_tokens=5,
        eos_token_id=None,
        streamer=TextStreamer(model.tokenizer, skip_prompt=True),
        generator=torch.Generator().manual_seed(1),
    )
    assert capsys.readouterr().out.strip() == out.texts[0].strip()
    with pytest.raises(ValueError, match="one sequence"):
        model.generate(["a", "b"], max_new_tokens=2, streamer=TextStreamer(model.tokenizer))


def test_seeded_generation_is_reproducible():
    model = make_model(3)
    kw = dict(max_new_tokens=6, return_thoughts=True, eos_token_id=None)
    a = model.generate("12+", generator=torch.Generator().manual_seed(0), **kw)
    b = model.generate("12+", generator=torch.Generator().manual_seed(0), **kw)
    c = model.generate("12+", generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a.new_tokens, b.new_tokens) and torch.equal(a.thoughts, b.thoughts)
    assert not torch.equal(a.thoughts, c.thoughts)


def test_decoder_calls_per_token_and_the_branch_is_dropped():
    """n + 1 decoder calls per new token (the text token shares a call with <start>, t_n with
    <end>), and the cache never holds more than the text plus one thought."""
    model = make_model(4)
    calls, key_lengths = [], []

    def hook(module, args, kwargs, output):
        calls.append(kwargs["inputs_embeds"].shape[1])
        key_lengths.append(kwargs[cache_keyword(module)].get_seq_length())

    handle = model.base_model.model.register_forward_hook(hook, with_kwargs=True)
    try:
        out = model.generate("Q: 2*21=", max_new_tokens=5, eos_token_id=None)
    finally:
        handle.remove()
    P = out.prompt_length
    n = 4
    # prefill [prompt, <start>], then per token: t_1..t_{n-1}, [t_n, <end>], [x, <start>] (not after the last)
    assert len(calls) == 1 + 5 * n + 4
    assert calls[0] == P + 1
    assert max(key_lengths) <= P + 5 + n + 2
    per_token = calls[1 : 1 + n]
    assert per_token == [1] * (n - 1) + [2]


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # top_p 0.7: 0.5 < 0.7, 0.5 + 0.3 >= 0.7 -> keep the first two
    kept = torch.isfinite(_filter_logits(logits, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter_logits(logits, 0, 0.5))  # exactly 0.5: the first alone
    assert kept.tolist() == [[True, False, False, False]]
    kept = torch.isfinite(_filter_logits(logits, 3, 1.0))
    assert kept.tolist() == [[True, True, True, False]]
    perm = torch.tensor([2, 0, 3, 1])
    kept = torch.isfinite(_filter_logits(logits[:, perm], 0, 0.9))  # order does not matter
    assert kept.tolist() == [[True, True, False, True]]


def test_sliding_window_too_short_is_refused():
    model = make_model(3, sliding_window=16)
    with pytest.raises(ValueError, match="sliding_window 16"):
        model.generate("Q: 1+1=", max_new_tokens=8)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=2, temperature=-1.0), ValueError, "temperature"),
        (dict(max_new_tokens=2, temperature=float("nan")), TypeError, "temperature"),
        (dict(max_new_tokens=2, top_p=0.0), ValueError, "top_p"),
        (dict(max_new_tokens=2, top_k=-2), ValueError, "top_k"),
        (dict(max_new_tokens=2, n_thought_tokens=0), ValueError, "n_thought_tokens"),
        (dict(max_new_tokens=2, stop_strings=[""]), ValueError, "stop_strings"),
        (dict(max_new_tokens=2, generator=3), TypeError, "generator"),
        (dict(max_new_tokens=2, streamer=5), TypeError, "streamer"),
    ],
)
def test_bad_arguments_are_named(kwargs, err, match):
    model = make_model(2)
    with pytest.raises(err, match=match):
        model.generate("12", **kwargs)


def test_bad_inputs_are_named():
    model = make_model(2)
    with pytest.raises(ValueError, match="contiguous"):
        model.generate(torch.tensor([[5, 6, 7]]), torch.tensor([[1, 0, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="no real token"):
        model.generate(torch.tensor([[5, 6, 7]]), torch.tensor([[0, 0, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"ids in \[0, 104\)"):
        model.generate(torch.tensor([[5, 600]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="shape of input_ids"):
        model.generate(torch.tensor([[5, 6]]), torch.ones(1, 3), max_new_tokens=2)
    with pytest.raises(TypeError, match="QuietStarForCausalLM"):
        qstar.generate(model.base_model, torch.tensor([[5, 6]]), max_new_tokens=2)
    model.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        model.generate("text", max_new_tokens=2)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, stop_strings=["x"])


def test_stream_checks_its_arguments_before_the_first_step():
    model = make_model(2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        qstar.stream(model, "12", max_new_tokens=0)  # raised here, not at the first next()
    it = qstar.stream(model, "12", max_new_tokens=2, eos_token_id=None)
    assert torch.is_grad_enabled()  # a suspended stream does not leave grad mode off for the caller
    next(it)
    assert torch.is_grad_enabled()


def test_bf16_model_generates_finite_float32_logits():
    model = make_model(3, dtype=torch.bfloat16)
    out = model.generate(["Q: 1+2=", "ab"], max_new_tokens=4, return_thoughts=True, output_logits=True)
    assert out.logits.dtype == torch.float32 and bool(torch.isfinite(out.logits).all())
    assert out.mixing_weights.dtype == torch.float32 and bool(torch.isfinite(out.mixing_weights).all())


def test_generate_cli_writes_texts_and_thoughts(tmp_path, capsys):
    import json

    from qstar.generate_cli import main

    out = tmp_path / "g.json"
    records = main(
        [
            "--model",
            "tiny",
            "--prompt",
            "Q: 1+2=",
            "--prompt",
            "ab",
            "--max-new-tokens",
            "3",
            "--compare",
            "--show-thoughts",
            "--json",
            str(out),
        ]  # fmt: skip
    )
    assert [(r["prompt"], r["think"]) for r in records] == [
        ("Q: 1+2=", True), ("ab", True), ("Q: 1+2=", False), ("ab", False)
    ]  # fmt: skip
    assert json.loads(out.read_text()) == records
    assert all(len(r["tokens"]) == 3 for r in records)
    assert len(records[0]["thoughts"]) == len(records[0]["mixing_weights"]) == 3
    printed = capsys.readouterr().out
    assert "[with thoughts] 'Q: 1+2='" in printed and "thought:" in printed
    with pytest.raises(ValueError, match="--prompt"):  # qstar-generate: one line, exit status 2
        main(["--model", "tiny"])


def test_text_keeps_the_leading_space_of_sentencepiece_tokens():
    """The new text is decoded after the prompt: SentencePiece drops a sequence's leading space, so
    decoding the new tokens alone would give 'Paris' for ' Paris'."""
    import os

    mistral_common = pytest.importorskip(
        "mistral_common", reason="the Mistral tokenizer ships in mistral_common"
    )
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "MistralCommonBackend"):
        pytest.skip(f"MistralCommonBackend is in transformers 5.x, found {transformers.__version__}")
    MistralCommonBackend = transformers.MistralCommonBackend

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    tok = MistralCommonBackend(tokenizer_path=path)
    base = tiny_mistral(32002, hidden=16, layers=1, heads=2, kv_heads=1)
    model = QuietStarForCausalLM(
        base, QuietStarConfig(n_thought_tokens=1), start_id=32000, end_id=32001, pad_token_id=2, tokenizer=tok
    ).eval()
    (paris,) = tok.encode("Paris", add_special_tokens=False)
    with torch.no_grad():  # make "▁Paris" the likeliest token everywhere
        base.lm_head.weight[paris] = 50 * base.model.norm.weight
    for think in (False, True):
        out = model.generate("The capital of France is", max_new_tokens=2, temperature=0, think=think)
        assert out.texts[0] == " Paris Paris"
        stopped = model.generate(
            "The capital of France is", max_new_tokens=4, stop_strings=[" Paris"], think=think
        )
        assert stopped.texts[0] == " Paris" and stopped.finish_reasons[0] == "stop"


def test_forward_and_generation_emit_no_deprecation_warnings():
    """The cache goes to transformers under the keyword the installed release expects (``cache`` or
    ``past_key_values``): recent 5.x warn on every call with the old one (item 8 of the redesign)."""
    import warnings

    model = make_model(2, dtype=torch.float32)
    ids = torch.tensor([model.tokenizer.encode("Q: 1+2=3")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train()(ids).loss.backward()
        with torch.no_grad():
            model.eval()(ids, output_logits=True)
        for think in (True, False):
            model.generate("Q: 1+", max_new_tokens=3, think=think, eos_token_id=None)
    deprecations = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, FutureWarning | DeprecationWarning)
    ]
    assert deprecations == []
