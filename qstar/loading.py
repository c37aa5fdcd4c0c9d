"""Every way to get a :class:`~qstar.model.QuietStarForCausalLM`, in one place.

    from qstar.loading import build_model, load_model
    model = build_model("tiny", get_preset("tiny-demo").method, seed=0)   # new heads over a base
    model = load_model("runs/x")            # a trained model: save_pretrained / checkpoint / run dir
    model = load_model("path/to/quietstar-8-ahead")   # the authors' released layout

:func:`build_model` puts new Quiet-STaR heads on a base model (the trainer's start): ``"tiny"`` (the
random tiny Mistral of :mod:`qstar.tiny`) or a Hugging Face causal LM path or name.
:func:`load_model` takes whatever a user points the command line at (``--model`` of
``qstar-eval`` and ``qstar-generate``): ``"tiny"``, a ``save_pretrained`` directory, a trainer
checkpoint or output directory, the authors' layout, or a plain HF model (a zero mixing head: the
untrained baseline). Both go through the public constructors of ``QuietStarForCausalLM``
(``from_base``, ``from_pretrained``, ``from_authors_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import torch

from .checkpoint import MANIFEST, verify_checkpoint
from .config import QuietStarConfig, get_preset
from .model import QuietStarForCausalLM
from .pretrained import CONFIG_NAME

log = logging.getLogger("qstar.loading")

__all__ = ["build_model", "check_model_arg", "load_model", "resolve_model_dir"]


def build_model(
    model: str, method: QuietStarConfig, seed: int, checkpoint: Path | None = None
) -> QuietStarForCausalLM:
    """A ``QuietStarForCausalLM``: from a trainer ``checkpoint`` directory (its ``model/``) when one
    is given, else new heads (initialised from ``seed``) over ``model``: ``"tiny"`` or an HF model
    path or name (loaded in float32 with SDPA attention)."""
    if not isinstance(model, str):  # the trainer's old form took a RunConfig
        raise TypeError(f"model must be 'tiny' or an HF model path or name (str), got {type(model).__name__}")
    if checkpoint is not None:
        return QuietStarForCausalLM.from_pretrained(str(Path(checkpoint) / "model"))
    if model == "tiny":
        from .tiny import tiny_mistral, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        base = tiny_mistral(len(tokenizer), seed=seed)
    else:
        tokenizer, base = _load_hf(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new heads' initialisation does not depend on the caller
        return QuietStarForCausalLM.from_base(base, tokenizer, method)


def _looks_like_path(spec: str) -> bool:
    """A spec that cannot be a Hugging Face hub name (``name`` or ``owner/name``): a local path."""
    return (
        spec.startswith(("/", ".", "~"))
        or spec.endswith("/")
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
    )


def check_model_arg(model: str) -> Path:
    """``--model`` of the trainer, checked before any work: ``"tiny"``, an existing directory, or
    something that can be a Hugging Face hub name (``name`` or ``owner/name``). Returns the path."""
    path = Path(model).expanduser()
    if model == "tiny":
        return path
    if not path.exists() and _looks_like_path(model):
        raise ValueError(
            f"--model {model!r}: no such directory (expected a model directory, a Hugging Face model "
            "name, or 'tiny')"
        )
    if path.exists() and not path.is_dir():
        raise ValueError(f"--model {model!r}: expected a model directory, got a file")
    return path


def _load_hf(model: str):
    """``(tokenizer, base model)`` of an HF causal LM directory or hub name (float32, SDPA). A path
    that does not exist, or a name that cannot be loaded, raises one ``ValueError`` line naming
    ``--model``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_arg(model)
    if _is_authors_layout(path) or (path / CONFIG_NAME).is_file():
        log.warning(
            "--model %r holds trained Quiet-STaR heads; training starts new heads over its base model "
            "(to continue a run use --resume)",
            model,
        )
    if not path.exists() and os.environ.get("HF_HUB_OFFLINE"):
        log.warning("--model %r is not a local directory; offline, only the local cache is read", model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else model)
        base = AutoModelForCausalLM.from_pretrained(
            str(path) if path.exists() else model, dtype=torch.float32, attn_implementation="sdpa"
        )
    except (OSError, ValueError) as err:
        where = "the directory" if path.exists() else "not a local directory, and the Hugging Face model"
        raise ValueError(f"--model {model!r}: {where} could not be loaded ({_first_line(err)})") from err
    return tokenizer, base


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def resolve_model_dir(path: Path) -> Path:
    """A trainer output directory -> its ``latest`` checkpoint; a checkpoint -> its ``model/``; any
    other path is returned as it is. A trainer checkpoint's ``model/`` is verified against its manifest
    first (:class:`qstar.checkpoint.CheckpointError` names a damaged file)."""
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if (path / MANIFEST).is_file():
        verify_checkpoint(path, under="model/")  # the weights it loads; not the optimizer state
    if (path / "model" / CONFIG_NAME).is_file():
        path = path / "model"
    return path


def _tensor_names(directory: Path) -> set[str] | None:
    """The tensor names of a checkpoint directory without reading its tensors (None: cannot tell):
    from the shard index, the safetensors headers, or a ``pytorch_model*.bin`` (memory-mapped,
    ``weights_only=True``: nothing is unpickled but tensors, and no tensor data is read)."""
    names: set[str] = set()
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            names |= set(json.loads((directory / index).read_text()).get("weight_map", {}))
    files = sorted(directory.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as st:
                names |= set(st.keys())
    elif not names:
        for f in sorted(directory.glob("pytorch_model*.bin")):
            try:
                try:
                    state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # an old (non-zip) .bin cannot be memory-mapped: read it
                    state = torch.load(f, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise ValueError(
                    f"{f}: not a plain tensor file; loading it with weights_only=True refused it "
                    f"({_first_line(err)})"
                ) from None
            if isinstance(state, dict):
                names |= set(state)
    return names or None


def _is_authors_layout(path: Path) -> bool:
    """The authors' layout: Mistral weights with ``start_embedding`` / ``talk_head.*`` beside them."""
    if not path.is_dir():
        return False
    names = _tensor_names(path)
    return names is not None and (
        "start_embedding" in names or any(n.startswith("talk_head.") for n in names)
    )


def load_model(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    tokenizer: str | None = None,
) -> QuietStarForCausalLM:
    """A model to evaluate or generate with, in eval mode, from ``spec``:

    * ``"tiny"``: the random tiny Mistral of :mod:`qstar.tiny` with the ``tiny-demo`` method (its
      mixing head is zero, so with and without thoughts agree: for trying the tools out);
    * a directory of ``QuietStarForCausalLM.save_pretrained`` (or a trainer checkpoint or output
      directory: its ``model/``, via ``latest``);
    * a directory in the authors' layout (``from_authors_checkpoint``, e.g. ``quietstar-8-ahead``);
    * any other HF causal LM path or name: wrapped with the ``default`` method and a zero mixing
      head, i.e. the untrained baseline (with = without).

    ``tokenizer``: a tokenizer path or name that replaces the model's. ``dtype``: cast after loading
    (the authors' layout is also built in it).
    """
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    path = resolve_model_dir(Path(spec).expanduser())
    if spec == "tiny":
        model = build_model("tiny", get_preset("tiny-demo").method, seed)
    elif (path / CONFIG_NAME).is_file():
        model = QuietStarForCausalLM.from_pretrained(path)
    elif _is_authors_layout(path):
        model = QuietStarForCausalLM.from_authors_checkpoint(path, tokenizer=tok, dtype=dtype)
    elif not path.exists() and _looks_like_path(spec):
        raise ValueError(
            f"--model {spec!r}: not 'tiny', and no such directory (expected a save_pretrained, checkpoint "
            "or output directory, the authors' checkpoint, or a Hugging Face model name)"
        )
    else:
        try:
            model = build_model(spec, get_preset("default").method, seed)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"--model {spec!r}: not 'tiny', not a Quiet-STaR or authors' checkpoint directory, and "
                f"loading it as a Hugging Face causal LM failed ({_first_line(err)})"
            ) from err
        log.warning(
            "--model %r has no Quiet-STaR heads: evaluating it with a zero mixing head (with thoughts "
            "= without)",
            spec,
        )
    if tok is not None:
        model.tokenizer = tok
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()
