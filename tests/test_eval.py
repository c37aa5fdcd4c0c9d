"""qstar.eval: the authors' zero-shot direct metric (hand-checked), zero-shot CoT with a majority
vote, perplexity and the gain from thinking by difficulty, data loading, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_mistral

import qstar.eval as ev
from qstar import QuietStarConfig, QuietStarForCausalLM
from qstar.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
LETTERS = list("ABCDE")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tiny_model(*, nonzero_head=True, thought_temperature=1.0, seed=0) -> QuietStarForCausalLM:
    """A 2-layer hidden-32 Mistral with qstar.tiny's character tokenizer (every ASCII character)."""
    tok = tiny_tokenizer()
    config = QuietStarConfig(n_thought_tokens=2, eval_thought_temperature=thought_temperature)
    with torch.random.fork_rng():  # the heads' initialisation must not depend on the tests run before
        torch.manual_seed(seed)
        model = QuietStarForCausalLM.from_base(tiny_mistral(len(tok), seed=seed), tok, config)
    if nonzero_head:
        with torch.no_grad():
            last = model.mixing_head[-1].weight
            last.copy_(torch.randn(last.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.5)
    return model.eval()


def row(n_allowed: int, column: int, p: float, shift: float = 3.0) -> torch.Tensor:
    """Logits over ``n_allowed`` ids whose softmax gives ``p`` at ``column`` (the rest share 1 - p
    equally). ``shift`` is added to all of them: only differences matter (renormalisation)."""
    probs = torch.full((n_allowed,), (1 - p) / (n_allowed - 1), dtype=torch.float64)
    probs[column] = p
    return (probs.log() + shift).float()


def char_id(tok, c: str) -> int:
    return tok.convert_tokens_to_ids(c)


# --------------------------------------------------------------------------------------------------
# Locating and scoring the answer, by hand
# --------------------------------------------------------------------------------------------------


def test_allowed_ids_of_the_character_tokenizer(tok):
    allowed = ev.answer_token_ids(tok)
    assert allowed.numeric == [char_id(tok, c) for c in "1234567890\n"]
    assert allowed.letters == [char_id(tok, c) for c in "ABCDE\n"]
    with pytest.raises(ValueError, match="repeated ids"):
        ev.AnswerTokens(numeric=[5, 5], letters=[1]).validate(100)
    with pytest.raises(ValueError, match=r"outside \[0, 100\) or meta tokens: \[100\]"):
        ev.AnswerTokens(numeric=[5], letters=[100]).validate(100)


def test_gsm8k_space_token_after_the_marker_is_skipped(tok):
    prompt = ev.gsm8k_direct_prompt("6*7?", "6*7 = <<6*7=42>>42\n#### 42")
    assert prompt == "Q: 6*7?\nA: 42\n"  # the number keeps its leading space
    ids = tok.encode(prompt)
    # 0 <s>, 1 Q, 2 :, 3 ' ', 4 6, 5 *, 6 7, 7 ?, 8 \n, 9 A, 10 :, 11 ' ', 12 4, 13 2, 14 \n
    assert len(ids) == 15
    loc = ev.locate_answer(ids, lambda t: tok.decode(t, skip_special_tokens=True))
    assert (loc.marker_index, loc.numeric, loc.first_target) == (10, True, 11)
    allowed = ev.answer_token_ids(tok).numeric + [char_id(tok, " ")]  # the space made allowed on purpose
    A = len(allowed)
    logits = torch.zeros(len(ids), A)  # uniform elsewhere
    logits[10] = row(A, allowed.index(char_id(tok, " ")), 0.01)  # predicts ' ' (ids[11])
    logits[11] = row(A, allowed.index(char_id(tok, "4")), 0.5)  # predicts '4'
    logits[12] = row(A, allowed.index(char_id(tok, "2")), 0.25)  # predicts '2'
    logits[13] = row(A, allowed.index(char_id(tok, "\n")), 0.8)  # predicts '\n'
    # p('4') p('2') p('\n') = 0.5 * 0.25 * 0.8 = 0.1; the space at position 10 is never scored.
    score = ev.score_answer(ids, logits, allowed, loc.first_target)
    assert score.probability == pytest.approx(0.1, rel=1e-6)
    assert [t.position for t in score.tokens] == [11, 12, 13]
    assert [t.probability for t in score.tokens] == pytest.approx([0.5, 0.25, 0.8], rel=1e-6)
    # Without the numeric offset the space would count: 0.01 * 0.1 = 0.001.
    assert ev.score_answer(ids, logits, allowed, loc.marker_index).probability == pytest.approx(
        1e-3, rel=1e-5
    )


def test_gsm8k_tokens_outside_the_allowed_set_are_skipped(tok):
    ids = tok.encode(
        ev.gsm8k_direct_prompt("x?", "#### 1,200")
    )  # ... ':', ' ', '1', ',', '2', '0', '0', '\n'
    loc = ev.locate_answer(ids, lambda t: tok.decode(t, skip_special_tokens=True))
    assert loc.numeric and loc.first_target == len(ids) - 7
    allowed = ev.answer_token_ids(tok).numeric
    A = len(allowed)
    logits = torch.zeros(len(ids), A)
    for j in range(loc.first_target, len(ids) - 1):
        target = ids[j + 1]
        if target in allowed:
            logits[j] = row(A, allowed.index(target), 0.5)
    # '1', '2', '0', '0', '\n' at 0.5 each, the comma skipped: 0.5 ** 5 = 0.03125.
    score = ev.score_answer(ids, logits, allowed, loc.first_target)
    assert score.probability == pytest.approx(0.03125, rel=1e-6)
    assert [tok.decode([t.token_id]) for t in score.tokens] == ["1", "2", "0", "0", "\n"]


def test_negative_gsm8k_answer_is_scored_with_the_letter_set(tok):
    # The authors' quirk: the character after "\nA: " is '-', not a digit, so the answer is scored
    # with letters + newline and offset 0: ' ', '-', '5' are skipped, only the newline counts.
    ids = tok.encode(ev.gsm8k_direct_prompt("4 - 9?", "4 - 9 = <<4-9=-5>>-5\n#### -5"))
    loc = ev.locate_answer(ids, lambda t: tok.decode(t, skip_special_tokens=True))
    assert not loc.numeric and loc.first_target == loc.marker_index == len(ids) - 5
    sets = ev.answer_token_ids(tok)
    A = len(sets.letters)
    logits = torch.zeros(len(ids), A)
    logits[len(ids) - 2] = row(A, A - 1, 0.4)  # the newline after '5', renormalised over A-E + \n
    score = ev.score_answer(ids, logits, sets.letters, loc.first_target)
    assert score.probability == pytest.approx(0.4, rel=1e-6)  # = p(\n) alone
    assert [t.token_id for t in score.tokens] == [char_id(tok, "\n")]


def test_csqa_letter_and_newline(tok):
    choices = {"label": LETTERS, "text": ["sea", "road", "sky", "shop", "park"]}
    prompt = ev.csqa_direct_prompt("Where do birds fly?", choices, "C")
    assert prompt == "Q: Where do birds fly?\n(A) sea\n(B) road\n(C) sky\n(D) shop\n(E) park\nA: C\n"
    ids = tok.encode(prompt)
    loc = ev.locate_answer(ids, lambda t: tok.decode(t, skip_special_tokens=True))
    n = len(ids)  # ..., n-4 ':', n-3 ' ', n-2 'C', n-1 '\n'
    assert (loc.numeric, loc.marker_index, loc.first_target) == (False, n - 4, n - 4)
    letters = ev.answer_token_ids(tok).letters
    logits = torch.zeros(n, 6)
    logits[n - 3] = row(6, 2, 0.6)  # predicts 'C'
    logits[n - 2] = row(6, 5, 0.5)  # predicts '\n'
    # ' ' is not a letter (skipped); p('C') p('\n') = 0.6 * 0.5 = 0.3.
    assert ev.score_answer(ids, logits, letters, loc.first_target).probability == pytest.approx(0.3, rel=1e-6)


def test_the_last_marker_counts(tok):
    # The question itself holds "\nA: B"; the answer is after the last "\nA:" and is numeric.
    prompt = ev.gsm8k_direct_prompt("Tom wrote\nA: B\nas his answer. What is 2+5?", "#### 7")
    ids = tok.encode(prompt)
    loc = ev.locate_answer(ids, lambda t: tok.decode(t, skip_special_tokens=True))
    n = len(ids)  # ..., n-4 ':', n-3 ' ', n-2 '7', n-1 '\n'
    assert (loc.marker_index, loc.numeric, loc.first_target) == (n - 4, True, n - 3)
    digits = ev.answer_token_ids(tok).numeric
    logits = torch.zeros(n, 11)
    for j in range(n - 1):  # every position gives its target (when a digit or newline) p = 0.01 ...
        if ids[j + 1] in digits:
            logits[j] = row(11, digits.index(ids[j + 1]), 0.01)
    logits[n - 3] = row(11, digits.index(char_id(tok, "7")), 0.5)  # ... except the real answer
    logits[n - 2] = row(11, 10, 0.5)
    # Only '7' and '\n' after the last marker: 0.5 * 0.5 = 0.25 (the '2', '5' of the question are not scored).
    assert ev.score_answer(ids, logits, digits, loc.first_target).probability == pytest.approx(0.25, rel=1e-6)
    with pytest.raises(ValueError, match="no answer marker"):
        ev.locate_answer(tok.encode("Q: nothing here\n"), lambda t: tok.decode(t, skip_special_tokens=True))


def test_score_needs_the_allowed_columns():
    with pytest.raises(ValueError, match=r"must be \(positions, 3\)"):
        ev.score_answer([1, 2, 3], torch.zeros(3, 2), [1, 2, 3], 0)


def test_mistral_tokenizer_gives_the_authors_ids():
    mistral_common = pytest.importorskip(
        "mistral_common", reason="the real Mistral-7B-v0.1 tokenizer ships in mistral_common (dev extra)"
    )
    import transformers

    if not hasattr(transformers, "MistralCommonBackend"):
        pytest.skip("this transformers has no MistralCommonBackend")
    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    mistral = transformers.MistralCommonBackend(tokenizer_path=path)
    allowed = ev.answer_token_ids(mistral)
    authors_digits = [28740, 28750, 28770, 28781, 28782, 28784, 28787, 28783, 28774, 28734, 13]
    assert allowed.numeric == ev.MISTRAL_DIGIT_IDS == authors_digits
    assert allowed.letters == ev.MISTRAL_LETTER_IDS == [330, 365, 334, 384, 413, 13]

    def decode(t):
        return mistral.decode(t, skip_special_tokens=True)

    ids = mistral.encode(ev.gsm8k_direct_prompt("What is 6*12?", "#### 72"))
    loc = ev.locate_answer(ids, decode)
    # ':' completes the marker; then '▁' (28705, skipped by the offset), '7', '2', '\n'.
    assert loc.numeric and ids[loc.marker_index] == 28747 and ids[loc.first_target] == 28705
    assert ids[loc.first_target + 1 :] == [28787, 28750, 13]
    choices = {"label": LETTERS, "text": ["a", "b", "c", "d", "e"]}
    ids = mistral.encode(ev.csqa_direct_prompt("Which?", choices, "B"))
    loc = ev.locate_answer(ids, decode)
    assert not loc.numeric and ids[loc.first_target + 1 :] == [365, 13]  # '▁B' then '\n'


# --------------------------------------------------------------------------------------------------
# The fast path on a model against a brute-force full softmax
# --------------------------------------------------------------------------------------------------


def authors_metric(ids_list, full_logits, digits, letters, decode) -> list[float]:
    """The metric as the authors compute it, per example: full softmax over the vocabulary, zero
    outside the allowed set, renormalise, multiply; the marker found by decoding prefixes."""
    scores = []
    for ids, logits in zip(ids_list, full_logits):
        text = decode(ids)
        numeric = text.split("\nA:")[-1][1].isdigit()
        valid = digits if numeric else letters
        total = text.count("\nA:")
        i = len(ids) - 1
        while decode(ids[:i]).count("\nA:") >= total:
            i -= 1
        probs = torch.softmax(logits[: len(ids)].double(), dim=-1)
        kept = torch.zeros_like(probs)
        kept[:, valid] = probs[:, valid]
        kept = kept / kept.sum(-1, keepdim=True)
        p = 1.0
        for j in range(i + int(numeric), len(ids) - 1):
            if ids[j + 1] in valid:
                p *= float(kept[j, ids[j + 1]])
        scores.append(p)
    return scores


@pytest.mark.parametrize("thought_temperature", [0.0, 1.0])
def test_direct_fast_path_equals_brute_force(thought_temperature):
    model = tiny_model(thought_temperature=thought_temperature)
    tok = model.tokenizer
    prompts = [
        ev.gsm8k_direct_prompt("Sam has 3 bags of 4 pears. How many pears?", "3*4=12\n#### 12"),
        ev.gsm8k_direct_prompt("It was 2 degrees and fell by 9. How cold is it now?", "#### -7"),
        ev.gsm8k_direct_prompt("A long question " + "about sheep " * 6 + "?", "#### 1,050"),  # truncated
        ev.csqa_direct_prompt("Where is bread sold?", {"label": LETTERS, "text": list("vwxyz")}, "D"),
        ev.csqa_direct_prompt("Pick one.\nA: E is wrong", {"label": LETTERS, "text": list("abcde")}, "A"),
    ]
    max_length = 64  # the third prompt (103 tokens) keeps its last 64
    allowed = ev.answer_token_ids(tok)
    res = ev.evaluate_direct(
        model, prompts, batch_size=8, max_length=max_length, generator=torch.Generator().manual_seed(5)
    )
    assert res.n_truncated == 1 and res.examples[2].truncated and res.examples[2].n_tokens == max_length

    ids_list = [tok.encode(p)[-max_length:] for p in prompts]
    L = max(len(i) for i in ids_list)
    ids = torch.full((len(prompts), L), model.pad_token_id)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for b, i in enumerate(ids_list):
        ids[b, : len(i)] = torch.tensor(i)
        mask[b, : len(i)] = 1
    with torch.no_grad():
        out = model(ids, mask, generator=torch.Generator().manual_seed(5), output_logits=True)
        base_logits = model.base_model(input_ids=ids, attention_mask=mask).logits  # the plain HF forward

    def decode(t):
        return tok.decode(t, skip_special_tokens=True)

    want_with = authors_metric(ids_list, out.logits, allowed.numeric, allowed.letters, decode)
    want_without = authors_metric(ids_list, base_logits, allowed.numeric, allowed.letters, decode)
    got_with = [e.p_with for e in res.examples]
    got_without = [e.p_without for e in res.examples]
    assert got_with == pytest.approx(want_with, rel=2e-4, abs=1e-9)
    assert got_without == pytest.approx(want_without, rel=2e-4, abs=1e-9)
    assert res.with_thoughts == pytest.approx(sum(want_with) / 5, rel=2e-4)
    assert res.without_thoughts == pytest.approx(sum(want_without) / 5, rel=2e-4)
    assert got_with != pytest.approx(got_without, rel=1e-3)  # the mixing head is not zero
    assert [e.numeric for e in res.examples] == [True, False, True, False, False]
    assert [e.answer for e in res.examples] == [" 12\n", " -7\n", " 1,050\n", " D\n", " A\n"]


# --------------------------------------------------------------------------------------------------
# Zero-shot CoT
# --------------------------------------------------------------------------------------------------


def test_answer_extraction_and_gold():
    assert ev.extract_first_integer(" 1,234 apples and 5 pears") == 1234
    assert ev.extract_first_integer(" -7 degrees") == 7  # the sign is lost (the authors' regex)
    assert ev.extract_first_integer(" 2.5 hours") == 2
    assert ev.extract_first_integer(" not a number") is None
    assert ev.gsm8k_gold("so 3 + 4 = 7\n#### 7") == 7
    assert ev.gsm8k_gold("#### 1,000") == 1000
    assert ev.gsm8k_gold("#### -5") == 5


def test_majority_vote_ties_go_to_the_first_seen():
    assert ev.majority_vote([3, 5, 5, 3]) == 3  # 2 votes each: 3 was sampled first
    assert ev.majority_vote([5, 3, 3, 5]) == 5
    assert ev.majority_vote([1, 2, 2]) == 2
    assert ev.majority_vote([None, None, 4]) is None  # "no integer" is a vote too
    with pytest.raises(ValueError, match="at least one"):
        ev.majority_vote([])


def test_cut_at_end_strings():
    prompt = "Q: 2+3?\nA: Let's think step by step."
    assert ev.cut_at_end_string(prompt + " It is 5.") is None
    assert ev.cut_at_end_string(prompt + " It is 5.\nQ: next") == prompt + " It is 5.\n"
    assert ev.cut_at_end_string(prompt + " 5\n\n\nmore") is None  # one "\n\n\n" goes on
    assert ev.cut_at_end_string(prompt + " 5\n\n\nmore\n\n\nx") == prompt + " 5\n\n\nmore"


def test_cot_stop_rules_and_vote_on_scripted_samples(monkeypatch):
    """A fake ``stream`` replays scripted tokens: the stop rules, the second prompt, the token
    budgets, the extraction and the vote, end to end, without a model's randomness."""
    model = tiny_model()
    tok = model.tokenizer
    eos = tok.eos_token_id

    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    scripts = [  # per call, per row
        [
            enc(" 2 plus 3 is 5.\nQ: what is 9?"),  # stops at the second "Q:"
            enc(" It is 6.\n\n\nMaybe\n\n\nnot this"),  # the first "\n\n\n" goes on, the second stops
            enc(" Five.") + [eos] + enc("Q: Q: ignored"),  # EOS stops; what follows is ignored
        ],
        [enc(" 5.") + [eos], enc(" 1,006 or 7"), enc(" 5 apples and more")],
    ]
    calls = []

    def fake_stream(
        model_, prompts, *, max_new_tokens, think, temperature, eos_token_id, generator, tokenizer
    ):
        script = scripts[len(calls)]
        calls.append((list(prompts), max_new_tokens, think, temperature, eos_token_id))
        longest = max(len(s) for s in script)
        for k in range(min(max_new_tokens, longest)):
            yield SimpleNamespace(
                tokens=torch.tensor([s[k] if k < len(s) else model_.pad_token_id for s in script])
            )

    monkeypatch.setattr(ev.cot, "stream", fake_stream)  # what evaluate_cot samples with
    res = ev.evaluate_cot(
        model, ["What is 2+3?"], [5], think=True, votes=3, max_new_tokens=40, answer_tokens=6, batch_size=3
    )
    prompt = "Q: What is 2+3?\nA: Let's think step by step."
    assert calls[0][0] == [prompt] * 3 and calls[0][1:4] == (40, True, 0.9)
    assert eos in calls[0][4] and tok.bos_token_id in calls[0][4]
    final = ev.FINAL_ANSWER_TEXT
    assert calls[1][0] == [
        prompt + " 2 plus 3 is 5." + final,  # cut before the second "Q:", then rstrip()
        prompt + " It is 6.\n\n\nMaybe" + final,
        prompt + " Five." + final,
    ]
    assert calls[1][1] == 6  # --cot-answer-tokens
    (ex,) = res.examples
    assert ex["texts"] == [
        prompt + " 2 plus 3 is 5." + final + " 5.",
        prompt + " It is 6.\n\n\nMaybe" + final + " 1,006",  # 6 tokens (characters) at most
        prompt + " Five." + final + " 5 app",
    ]
    assert ex["votes"] == [5, 1006, 5]  # commas removed
    assert ex["majority"] == 5 and ex["correct"] and res.accuracy == 1.0


def test_cot_end_to_end_on_a_tiny_model():
    model = tiny_model()
    questions = ["What is 2+3?", "Ann has 4 cats and 3 dogs. How many pets?"]
    results = {}
    for think in (False, True):
        kw = dict(think=think, votes=2, max_new_tokens=5, answer_tokens=3, batch_size=3)
        res = ev.evaluate_cot(model, questions, [5, 7], generator=torch.Generator().manual_seed(1), **kw)
        again = ev.evaluate_cot(model, questions, [5, 7], generator=torch.Generator().manual_seed(1), **kw)
        assert [e["texts"] for e in res.examples] == [e["texts"] for e in again.examples]  # seeded
        assert res.accuracy in (0.0, 0.5, 1.0) and res.think is think
        for q, e in zip(questions, res.examples):
            assert len(e["texts"]) == len(e["votes"]) == 2
            for text, vote in zip(e["texts"], e["votes"]):
                assert text.startswith(ev.cot_prompt(q)) and ev.FINAL_ANSWER_TEXT in text
                assert vote == ev.extract_first_integer(text.split(ev.FINAL_ANSWER_TEXT)[-1])
            assert e["majority"] == ev.majority_vote(e["votes"])
        results[think] = res
    assert [e["texts"] for e in results[True].examples] != [e["texts"] for e in results[False].examples]


# --------------------------------------------------------------------------------------------------
# Perplexity and the gain by difficulty
# --------------------------------------------------------------------------------------------------


def test_perplexity_equals_exp_mean_nll_computed_independently():
    model = tiny_model(thought_temperature=0.0)  # greedy thoughts: the same in any batch
    tok = model.tokenizer
    docs = ["12+30=42 and 7*6=42 too; " * 2, "short one"]
    res = ev.evaluate_perplexity(model, docs, max_length=16, batch_size=3, n_buckets=4)
    lengths = [len(tok.encode(d)) for d in docs]  # 51 and 10 tokens: windows of 16, 16, 16, 3 and 10
    assert res.n_windows == 5 and res.n_tokens == sum(lengths) - 5
    nll_without, nll_with = [], []
    for d in docs:
        ids = tok.encode(d)
        for s in range(0, len(ids), 16):
            window = torch.tensor([ids[s : s + 16]])
            if window.shape[1] < 2:
                continue
            if window.shape[1] < 3:  # the model needs 3 positions: pad one
                window = torch.cat([window, torch.tensor([[model.pad_token_id]])], 1)
            with torch.no_grad():
                base = model.base_model(input_ids=window).logits[0]
                mixed = model(window, output_logits=True).logits[0]
            n = len(ids[s : s + 16])
            target = window[0, 1:n]
            for logits, sink in ((base, nll_without), (mixed, nll_with)):
                sink.append(-torch.log_softmax(logits[: n - 1].double(), -1).gather(1, target[:, None])[:, 0])
    nll_without, nll_with = torch.cat(nll_without), torch.cat(nll_with)
    assert res.perplexity_without == pytest.approx(math.exp(float(nll_without.mean())), rel=1e-5)
    assert res.perplexity_with == pytest.approx(math.exp(float(nll_with.mean())), rel=1e-5)
    assert res.nll_without.numpy() == pytest.approx(nll_without.numpy(), abs=1e-4)
    assert res.mean_gain == pytest.approx(float((nll_without - nll_with).mean()), abs=1e-5)
    assert res.perplexity_with != pytest.approx(res.perplexity_without, rel=1e-4)
    assert sum(b.count for b in res.buckets) == res.n_tokens


def test_difficulty_buckets_by_hand_and_partition():
    nll_without = torch.tensor([0.1, 2.0, 0.5, 3.0, 1.0])
    nll_with = torch.tensor([0.2, 1.0, 0.5, 1.0, 1.5])
    buckets, which = ev.difficulty_buckets(nll_without, nll_with, 2)
    # Sorted by base NLL: 0.1 (#0), 0.5 (#2), 1.0 (#4) | 2.0 (#1), 3.0 (#3).
    assert which.tolist() == [0, 1, 0, 1, 0]
    assert [b.count for b in buckets] == [3, 2]
    # Gains (without - with): easy -0.1, 0.0, -0.5 -> mean -0.2; hard 1.0, 2.0 -> mean 1.5.
    assert buckets[0].mean_gain == pytest.approx(-0.2) and buckets[1].mean_gain == pytest.approx(1.5)
    assert (buckets[0].nll_low, buckets[0].nll_high) == pytest.approx((0.1, 1.0))
    assert buckets[1].mean_nll_with == pytest.approx(1.0)

    g = torch.Generator().manual_seed(0)
    base, think = torch.rand(23, generator=g) * 5, torch.rand(23, generator=g) * 5
    buckets, which = ev.difficulty_buckets(base, think, 5)
    assert [b.count for b in buckets] == [5, 5, 5, 4, 4]
    assert sorted(which.tolist()) == which.sort().values.tolist() and set(which.tolist()) == set(range(5))
    for k in range(5):  # every token in exactly one bucket, the buckets in order of difficulty
        members = base[which == k]
        assert members.numel() == buckets[k].count
        if k:
            assert buckets[k - 1].nll_high <= buckets[k].nll_low
    total = sum(b.count * b.mean_gain for b in buckets)
    assert total == pytest.approx(float((base.double() - think.double()).sum()), rel=1e-9)
    ties, which = ev.difficulty_buckets(torch.ones(6), torch.zeros(6), 3)
    assert which.tolist() == [0, 0, 1, 1, 2, 2]  # equal NLLs split by position


def test_zero_mixing_head_gains_exactly_nothing():
    model = tiny_model(nonzero_head=False, thought_temperature=1.0)  # w = 0: mixed = base
    res = ev.evaluate_perplexity(
        model, ["3+4=7. 9-2=7. 5+5=10."], max_length=12, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(res.nll_with, res.nll_without)
    assert res.mean_gain == 0.0 and res.perplexity_with == res.perplexity_without
    assert all(b.mean_gain == 0.0 for b in res.buckets) and res.mean_mixing_weight == 0.0


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def test_fixtures_load():
    gsm = ev.load_gsm8k(str(FIXTURES / "gsm8k_test.jsonl"))
    csqa = ev.load_csqa(str(FIXTURES / "csqa_validation.jsonl"))
    assert len(gsm) == 6 and len(csqa) == 5
    assert ev.gsm8k_direct_prompt(gsm[2]["question"], gsm[2]["answer"]).endswith("\nA: 1,200\n")
    assert [ev.gsm8k_gold(r["answer"]) for r in gsm] == [19, 25, 1200, 5, 34, 7]
    assert csqa[0]["id"] == "fixture-000" and csqa[0]["question_concept"] == "kettle"
    docs = ev.load_texts(str(FIXTURES / "text.txt"))
    assert len(docs) == 3 and docs[0].startswith("A prime number")


def test_bad_inputs_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"--gsm8k '.*missing.jsonl': no such file"):
        ev.load_gsm8k(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"--gsm8k .* record 1: missing field\(s\) \['question', 'answer'\]"):
        ev.load_gsm8k(str(bad))
    bad.write_text(json.dumps({"question": "x", "answer": "no final number"}) + "\n")
    with pytest.raises(ValueError, match="no '#### <number>'"):
        ev.load_gsm8k(str(bad))
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match="--csqa .* line 1: not valid JSON"):
        ev.load_csqa(str(bad))
    record = {"question": "q", "choices": {"label": ["A", "B"], "text": ["x"]}, "answerKey": "A"}
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="'choices' must be"):
        ev.load_csqa(str(bad))
    record["choices"]["text"] = ["x", "y"]
    record["answerKey"] = ""
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="empty 'answerKey'"):
        ev.load_csqa(str(bad))
    with pytest.raises(ValueError, match="--text .*: no such file"):
        ev.load_texts(str(tmp_path / "none.txt"))
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['text'\]"):
        ev.load_texts(str(bad))
    assert ev.load_texts(str(bad), text_field="body") == ["x"]
    with pytest.raises(ValueError, match="--tasks: unknown task"):
        ev.run(ev.parse_args(["--model", "tiny", "--tasks", "gsm8k,mmlu"]))
    with pytest.raises(ValueError, match="--tasks perplexity needs --text"):
        ev.run(ev.parse_args(["--model", "tiny", "--tasks", "perplexity"]))
    with pytest.raises(ValueError, match="--digit-ids must be comma-separated"):
        ev.command._int_list("1,x", "--digit-ids")


def test_datasets_names_read_the_cache(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(*args, split):
        calls.append((args, split))
        if args[0] == "gsm8k":
            return datasets.Dataset.from_dict({"question": ["1+1?"], "answer": ["1+1=2\n#### 2"]})
        choices = [{"label": LETTERS, "text": list("abcde")}]
        return datasets.Dataset.from_dict(
            {
                "id": ["x"],
                "question": ["?"],
                "question_concept": ["c"],
                "choices": choices,
                "answerKey": ["B"],
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert ev.load_gsm8k("gsm8k") == [{"question": "1+1?", "answer": "1+1=2\n#### 2"}]
    csqa = ev.load_csqa("tau/commonsense_qa")
    assert csqa[0]["choices"]["text"] == list("abcde") and csqa[0]["answerKey"] == "B"
    assert calls == [(("gsm8k", "main"), "test"), (("tau/commonsense_qa",), "validation")]


def test_datasets_name_offline_not_cached_is_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # datasets and huggingface_hub read HF_HUB_OFFLINE at import; set what they read.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"--gsm8k .*offline mode is on, and it is not in the local cache"):
        ev.load_gsm8k("qstar-no-such-org/no-such-dataset")


def test_cot_subset_is_the_datasets_shuffle():
    datasets = pytest.importorskip("datasets")
    shuffled = datasets.Dataset.from_dict({"i": list(range(50))}).shuffle(seed=42)
    assert ev.shuffled_indices(50, 42) == list(shuffled["i"])
    assert ev.shuffled_indices(4, None) == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def test_cli_on_the_fixtures_writes_json_and_png(tmp_path):
    out = tmp_path / "eval"
    cmd = [
        sys.executable, "-m", "qstar.eval", "--model", "tiny",
        "--tasks", "gsm8k,csqa,gsm8k-cot,perplexity",
        "--gsm8k", str(FIXTURES / "gsm8k_test.jsonl"), "--csqa", str(FIXTURES / "csqa_validation.jsonl"),
        "--text", str(FIXTURES / "text.txt"), "--output-dir", str(out), "--limit", "3",
        "--cot-votes", "2", "--cot-max-new-tokens", "6", "--cot-answer-tokens", "3",
        "--cpu-threads", "1", "--no-progress",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert set(report["tasks"]) == {"gsm8k", "csqa", "gsm8k-cot", "perplexity"}
    assert report["model"] == "tiny" and report["settings"]["limit"] == 3
    for name in ("gsm8k", "csqa", "gsm8k-cot"):
        task = report["tasks"][name]
        assert task["n"] == 3 and len(task["examples"]) == 3
        assert 0 <= task["without_thoughts"] <= 1 and 0 <= task["with_thoughts"] <= 1
    assert report["tasks"]["gsm8k"]["allowed_ids"]["numeric"] == ev.answer_token_ids(tiny_tokenizer()).numeric
    ppl = report["tasks"]["perplexity"]
    assert ppl["n_documents"] == 3 and len(ppl["buckets"]) == 5
    assert ppl["perplexity_with"] == ppl["perplexity_without"]  # the random tiny model's head is zero
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_script_entry_point_returns_zero(monkeypatch):
    assert 'qstar-eval = "qstar.eval:cli"' in (ROOT / "pyproject.toml").read_text()
    seen = []
    monkeypatch.setattr(ev.command, "main", lambda argv: seen.append(argv) or {"tasks": {}})
    monkeypatch.setattr(sys, "argv", ["qstar-eval", "--model", "tiny"])
    assert ev.cli() == 0 and seen == [["--model", "tiny"]]


def test_eval_settings_with_several_rationales_and_talk_tokens_score_the_same():
    """eval_n_rationales = 2 runs two copies of every example (rows b*2, b*2+1), eval_n_talk_tokens = 4
    needs 6 positions: with greedy thoughts the scores equal those of the authors' 1 and 1."""
    model = tiny_model(thought_temperature=0.0)
    prompts = [
        ev.gsm8k_direct_prompt("What is 2+2?", "#### 4"),
        ev.csqa_direct_prompt("Pick.", {"label": LETTERS, "text": list("abcde")}, "C"),
        ev.gsm8k_direct_prompt("And 30+12?", "#### 42"),
    ]
    docs = ["12+30=42 and 7*6=42 too", "ab"]  # "ab" (+ BOS) is one window of 3 tokens
    want = ev.evaluate_direct(model, prompts, batch_size=3)
    want_ppl = ev.evaluate_perplexity(model, docs, max_length=8, batch_size=4)
    model.config.eval_n_rationales, model.config.eval_n_talk_tokens = 2, 4
    got = ev.evaluate_direct(model, prompts, batch_size=3)
    got_ppl = ev.evaluate_perplexity(model, docs, max_length=8, batch_size=4)
    for a, b in zip(want.examples, got.examples):
        assert a.p_without == pytest.approx(b.p_without, rel=1e-5)
        assert a.p_with == pytest.approx(b.p_with, rel=1e-5)
    assert len({round(e.p_with, 6) for e in got.examples}) == 3  # three different examples, not copies
    torch.testing.assert_close(got_ppl.nll_with, want_ppl.nll_with, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_ppl.nll_without, want_ppl.nll_without, rtol=1e-5, atol=1e-6)


def test_no_thoughts_equals_thinking_with_a_zero_head_and_costs_one_pass():
    """``think=False`` (``--no-thoughts``) gives the numbers of the full eval forward when the mixing
    head is zero, from the base pass alone."""
    model = tiny_model(nonzero_head=False)
    text = ["3+4=7. 9-2=7. 5+5=10.", "12*3=36."]
    full = ev.evaluate_perplexity(model, text, max_length=12, generator=torch.Generator().manual_seed(0))
    calls = []
    hook = model.decoder.register_forward_hook(lambda *a: calls.append(1))
    fast = ev.evaluate_perplexity(model, text, max_length=12, think=False)
    hook.remove()
    assert len(calls) == 1  # the 3 windows fit one batch: one decoder pass, no thought steps
    torch.testing.assert_close(fast.nll_without, full.nll_without, rtol=1e-6, atol=1e-6)
    assert torch.equal(fast.nll_with, fast.nll_without) and fast.mean_mixing_weight == 0.0
    prompts = [ev.gsm8k_direct_prompt("2+3?", "#### 5"), ev.gsm8k_direct_prompt("9-1?", "#### 8")]
    d_full = ev.evaluate_direct(model, prompts, generator=torch.Generator().manual_seed(0))
    d_fast = ev.evaluate_direct(model, prompts, think=False)
    assert d_fast.without_thoughts == pytest.approx(d_full.without_thoughts, rel=1e-6)
    assert d_fast.with_thoughts == d_fast.without_thoughts


def test_no_thoughts_flag_is_checked_against_the_thought_flags():
    with pytest.raises(ValueError, match="--no-thoughts: gsm8k-cot"):
        ev.run(ev.parse_args(["--model", "tiny", "--tasks", "gsm8k-cot", "--no-thoughts"]))
    with pytest.raises(ValueError, match="--thought-temperature: no thoughts"):
        ev.run(ev.parse_args(["--model", "tiny", "--no-thoughts", "--thought-temperature", "1"]))


def test_the_shipped_word_problems_by_name():
    records = ev.load_gsm8k("word-problems-heldout")
    texts = ev.load_texts("word-problems-heldout")
    assert len(records) == len(texts) == 200
    assert records[0]["answer"].rstrip().split("#### ")[-1].lstrip("-").isdigit()
    assert texts[0].startswith("Q: ") and records[0]["question"] in texts[0]
