"""qstar.data: document loading, the authors' windows, the sharded resumable sampler; qstar.tiny."""

from __future__ import annotations

import json

import pytest
import torch

from qstar.data import DEMO_CORPUS, GlobalBatchSampler, load_documents, make_windows
from qstar.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_txt_documents_split_on_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\n\n three \n \nfour\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "five"}) + "\n\n" + json.dumps({"text": "six"}) + "\n"
    )
    assert load_documents(tmp_path / "a.txt") == ["one\ntwo", "three", "four"]
    assert load_documents(str(tmp_path)) == ["one\ntwo", "three", "four", "five", "six"]
    assert load_documents(f"{tmp_path / 'b.jsonl'},{tmp_path / 'a.txt'}")[:2] == ["five", "six"]


def test_jsonl_field_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"body": "x"}) + "\n")
    assert load_documents(f, text_field="body") == ["x"]
    with pytest.raises(ValueError, match=r"line 1: expected an object with a 'text' field"):
        load_documents(f)
    f.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        load_documents(f)
    with pytest.raises(ValueError, match="no such file"):
        load_documents(tmp_path / "missing.txt")


def test_datasets_name_offline_not_cached_is_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # datasets and huggingface_hub read HF_HUB_OFFLINE at import; set what they read.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="offline mode is on, and it is not in the local cache"):
        load_documents("qstar-no-such-org/no-such-dataset")


def test_datasets_name_reads_the_text_column(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"text": ["a b", " ", "c"], "meta": [1, 2, 3]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_documents("org/corpus", split="train[:3]") == ["a b", "c"]
    assert calls == [("org/corpus", "train[:3]")]
    with pytest.raises(ValueError, match="expected a 'body' column"):
        load_documents("org/corpus", text_field="body")


def test_windows_bos_padding_and_one_seeded_random_window(tok):
    docs = ["12+3=15", "x" * 5 + "0123456789" * 5]
    w = make_windows(docs, tok, seq_len=16, seed=0)
    assert w.input_ids.shape == (2, 16) and w.input_ids.dtype == torch.long
    short = tok.encode("12+3=15")  # BOS first
    assert w.input_ids[0, : len(short)].tolist() == short
    assert w.attention_mask[0].tolist() == [1] * len(short) + [0] * (16 - len(short))
    assert (w.input_ids[0, len(short) :] == tok.pad_token_id).all()
    assert w.attention_mask[1].all()
    full = tok.encode(docs[1])
    text = full  # the long document's window is a contiguous slice of BOS + document
    starts = [i for i in range(len(text) - 15) if text[i : i + 16] == w.input_ids[1].tolist()]
    assert starts, "the window is not a slice of the document"
    again = make_windows(docs, tok, seq_len=16, seed=0)
    assert torch.equal(again.input_ids, w.input_ids)
    others = {tuple(make_windows(docs, tok, seq_len=16, seed=s).input_ids[1].tolist()) for s in range(8)}
    assert len(others) > 1, "the window start does not depend on the seed"


def test_sampler_same_global_batches_on_any_world_size_and_resumes():
    single = GlobalBatchSampler(10, 4, 2, seed=3)
    ranks = [GlobalBatchSampler(10, 4, 1, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):  # crosses epochs (10 windows, 2 batches of 4 each, the rest dropped)
        glob = torch.cat(single.next_batch())
        parts = [torch.cat(s.next_batch()) for s in ranks]
        assert torch.equal(torch.cat(parts), glob)
    assert single.epoch == 3
    state = single.state_dict()
    expected = [single.next_batch() for _ in range(3)]
    resumed = GlobalBatchSampler(10, 4, 2, seed=3)
    resumed.load_state_dict(state)
    assert all(
        torch.equal(torch.cat(a), torch.cat(b))
        for a, b in zip(expected, (resumed.next_batch() for _ in range(3)))
    )
    assert len(single.next_batch()) == 2  # 2 micro-batches of 2 per step
    with pytest.raises(
        ValueError, match=r"batch_size \(6\) must be a multiple of micro_batch_size x world size"
    ):
        GlobalBatchSampler(10, 6, 2, seed=0, world_size=2)
    with pytest.raises(ValueError, match="resume with the same"):
        GlobalBatchSampler(11, 4, 2, seed=3).load_state_dict(state)


def test_tiny_tokenizer_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    assert tok.encode("---", add_special_tokens=False) == [tok.convert_tokens_to_ids("-")] * 3
    assert tok.encode("a")[0] == tok.bos_token_id
    assert tok.padding_side == "right" and tok.pad_token_id != tok.eos_token_id
    text = "17+25=42\n\t(x)"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(text) == tok.encode(text) and len(again) == len(tok)


def test_demo_corpus_ships_and_is_arithmetic():
    docs = load_documents(DEMO_CORPUS)
    assert len(docs) >= 1000
    lhs, rhs = docs[0].splitlines()[0].split("=")
    assert eval(lhs) == int(rhs)  # noqa: S307 - our own generated corpus
