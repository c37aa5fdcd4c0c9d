"""Training data: documents -> fixed-length windows -> a seeded, resumable, rank-sharded sampler.

Documents come from local files or a ``datasets`` name (:func:`load_documents`):

* ``.txt``: documents are separated by blank lines (one or more empty lines); a file without a
  blank line is one document. Leading and trailing whitespace of each document is dropped.
* ``.jsonl``: one JSON object per line; the document is its ``text`` field (``text_field``).
* a directory: every ``.txt`` and ``.jsonl`` file in it, in sorted order.
* a shipped corpus by name (:data:`NAMED_CORPORA`): ``word-problems`` and
  ``word-problems-heldout`` (``qstar/word_problems.py``); a local file or directory of the same
  name comes first.
* anything else is a ``datasets`` name, loaded with ``datasets.load_dataset(name, split=...)``;
  offline this reads the local Hugging Face cache, and a name that is not there raises an error that
  says so.

Windows are built the authors' way (``docs/training.md``, "Data and optimisation"; :func:`make_windows`): each
document is tokenised with BOS first (when the tokenizer has one); a document longer than
``seq_len`` contributes ONE random window, chosen once from the seed; a shorter one is right-padded
with the pad id (the tokenizer's pad token, else its EOS). ``attention_mask`` marks the real tokens.

:class:`GlobalBatchSampler` draws the same global batch of ``batch_size`` windows per optimizer step
whatever the number of processes, then hands each rank its contiguous slice, cut into micro-batches.
Its state is (epoch, position) and it resumes exactly.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .word_problems import HELDOUT_PATH, TRAIN_PATH

#: the corpus shipped for the tiny demo (``scripts/make_arithmetic_corpus.py`` writes it).
DEMO_CORPUS = Path(__file__).resolve().parent / "demo_data" / "arithmetic.txt"

#: the corpora shipped in the package, by the name ``--data`` accepts (``text`` is their text field).
NAMED_CORPORA = {"word-problems": TRAIN_PATH, "word-problems-heldout": HELDOUT_PATH}

_BLANK_LINES = re.compile(r"\n[ \t\r]*\n")


def read_utf8(path: Path, arg: str = "--data") -> str:
    """The text of ``path``; bytes that are not UTF-8 raise a ``ValueError`` naming ``arg``, the
    file and the line (e.g. a binary file given as data)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{arg} {str(path)!r} line {line}: not UTF-8 text (byte {data[err.start]:#04x} at offset "
            f"{err.start}); is it a binary file?"
        ) from None


def read_text_documents(path: Path, arg: str = "--data") -> list[str]:
    """The documents of a .txt file: blocks separated by blank lines, stripped, empty ones dropped."""
    text = read_utf8(path, arg)
    return [doc.strip() for doc in _BLANK_LINES.split(text) if doc.strip()]


def read_jsonl_records(path: Path, arg: str = "--data") -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a .jsonl file; ``arg`` names the
    command-line argument in the errors (bytes that are not UTF-8, a line that is not JSON, or not
    a JSON object)."""
    records = []
    for lineno, line in enumerate(read_utf8(path, arg).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{arg} {str(path)!r} line {lineno}: not valid JSON ({err})") from err
        if not isinstance(record, dict):
            raise ValueError(
                f"{arg} {str(path)!r} line {lineno}: expected a JSON object, got {type(record).__name__}"
            )
        records.append((lineno, record))
    return records


def text_field_value(record: dict, text_field: str, where: str, flag: str = "--text-field") -> str:
    """``record[text_field]``, which must be a string: a number, null, a list or an object is
    refused (they would otherwise become documents such as ``"5"`` or ``"None"``). ``where`` starts
    the error (the argument, the file and the line)."""
    if text_field not in record:
        raise ValueError(
            f"{where}: expected an object with a {text_field!r} field ({flag}), got {sorted(record)}"
        )
    value = record[text_field]
    if not isinstance(value, str):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(
            f"{where}: the {text_field!r} field ({flag}) must be a string, got {type(value).__name__} {shown}"
        )
    return value


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    for lineno, record in read_jsonl_records(path, "--data"):
        text = text_field_value(record, text_field, f"--data {str(path)!r} line {lineno}")
        if text.strip():
            docs.append(text)
    return docs


def _read_datasets(name: str, split: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            f"--data {name!r} is not a local file or directory, and the `datasets` package that would "
            "load it by name is not installed (pip install 'qstar-kernels[train]')"
        ) from err
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        offline = getattr(datasets.config, "HF_HUB_OFFLINE", False) or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (offline mode is on, and it is not in the local cache)" if offline else ""
        raise ValueError(
            f"--data {name!r}: not a local file or directory, and datasets.load_dataset({name!r}, "
            f"split={split!r}) could not load it{hint}. Offline, only datasets already in the local "
            f"Hugging Face cache can be loaded by name. Cause: {type(err).__name__}: {err}"
        ) from err
    if text_field not in ds.column_names:
        raise ValueError(
            f"--data {name!r}: expected a {text_field!r} column (--text-field), got {ds.column_names}"
        )
    texts = ds[text_field]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(
                f"--data {name!r} row {i}: the {text_field!r} column (--text-field) must hold strings, "
                f"got {type(t).__name__} {t!r:.60}"
            )
    return [t for t in texts if t.strip()]


def load_documents(sources: str | os.PathLike | list, *, text_field: str = "text", split: str = "train"):
    """The documents of ``sources``: one path or name, a comma-separated string, or a list."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [s for s in str(sources).split(",") if s.strip()]
    if not sources:
        raise ValueError("--data must name at least one file, directory or datasets name, got none")
    docs: list[str] = []
    for source in sources:
        path = Path(str(source).strip()).expanduser()
        if not path.exists() and str(source).strip() in NAMED_CORPORA:
            path = NAMED_CORPORA[str(source).strip()]
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
            if not files:
                raise ValueError(f"--data {str(path)!r}: the directory has no .txt or .jsonl file")
        elif path.is_file():
            files = [path]
        elif path.suffix in (".txt", ".jsonl", ".json"):
            raise ValueError(f"--data {str(path)!r}: no such file")
        else:
            docs.extend(_read_datasets(str(source).strip(), split, text_field))
            continue
        for f in files:
            if f.suffix == ".jsonl":
                docs.extend(_read_jsonl(f, text_field))
            elif f.suffix == ".txt":
                docs.extend(read_text_documents(f))
            else:
                raise ValueError(f"--data {str(f)!r}: expected a .txt or .jsonl file, got {f.suffix!r}")
    if not docs:
        raise ValueError(f"--data {sources}: no non-empty document found")
    return docs


@dataclass
class Windows:
    """Fixed-length training windows. ``input_ids`` (N, L) int64, right-padded with ``pad_id``;
    ``attention_mask`` (N, L) int64, 1 = real token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pad_id: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad windows with")
    return int(pad)


def make_windows(documents: list[str], tokenizer, seq_len: int, seed: int) -> Windows:
    """One window of ``seq_len`` tokens per document (the authors' ``truncate_or_pad``)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    pad = pad_token_id(tokenizer)
    bos = tokenizer.bos_token_id
    encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)  # the window starts, drawn once, in document order
    ids = torch.full((len(encoded), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), seq_len), dtype=torch.long)
    for i, toks in enumerate(encoded):
        toks = ([bos] if bos is not None else []) + list(toks)
        if len(toks) > seq_len:
            start = rng.randint(0, len(toks) - seq_len)
            toks = toks[start : start + seq_len]
        ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        mask[i, : len(toks)] = 1
    return Windows(ids, mask, pad)


class GlobalBatchSampler:
    """Global batches of window indices: the same batches on any number of ranks.

    Epoch ``e`` is a permutation of ``range(n)`` drawn from ``seed + e``; each optimizer step takes
    the next ``batch_size`` indices (a last incomplete batch is dropped and the next epoch begins).
    Rank ``r`` of ``world_size`` gets the ``r``-th contiguous slice of ``batch_size / world_size``
    indices, cut into micro-batches of ``micro_batch_size``. ``state_dict()`` is (epoch, position).
    """

    def __init__(
        self, n: int, batch_size: int, micro_batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ):
        if batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of micro_batch_size x world size "
                f"({micro_batch_size} x {world_size} = {micro_batch_size * world_size})"
            )
        if n < batch_size:
            raise ValueError(f"the data has {n} windows, fewer than one batch (batch_size={batch_size})")
        self.n, self.batch_size, self.micro_batch_size = n, batch_size, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.accumulation_steps = batch_size // (micro_batch_size * world_size)
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)

    def next_batch(self) -> list[torch.Tensor]:
        """This rank's micro-batches (``accumulation_steps`` index tensors) for the next step."""
        if self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        batch = self._perm[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        per_rank = self.batch_size // self.world_size
        mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
        return list(mine.split(self.micro_batch_size))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's data ({state['n']} windows, seed {state['seed']}) is not this run's "
                f"({self.n} windows, seed {self.seed}): resume with the same --data, --seq-len and --seed"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)
