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
from pathlib import Path

import torch

from .config import QuietStarConfig, get_preset
from .model import QuietStarForCausalLM
from .pretrained import CONFIG_NAME

log = logging.getLogger("qstar.loading")

__all__ = ["build_model", "load_model", "resolve_model_dir"]


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
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(model).exists() and os.environ.get("HF_HUB_OFFLINE"):
            log.warning("--model %r is not a local directory; offline, only the local cache is read", model)
        tokenizer = AutoTokenizer.from_pretrained(model)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new heads' initialisation does not depend on the caller
        return QuietStarForCausalLM.from_base(base, tokenizer, method)


def resolve_model_dir(path: Path) -> Path:
    """A trainer output directory -> its ``latest`` checkpoint; a checkpoint -> its ``model/``; any
    other path is returned as it is."""
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if (path / "model" / CONFIG_NAME).is_file():
        path = path / "model"
    return path


def _tensor_names(directory: Path) -> set[str] | None:
    """The tensor names of a checkpoint directory without loading it (None: cannot tell)."""
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
    else:
        log.warning(
            "--model %r has no Quiet-STaR heads: evaluating it with a zero mixing head (with thoughts "
            "= without)",
            spec,
        )
        try:
            model = build_model(spec, get_preset("default").method, seed)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"--model {spec!r}: not 'tiny', not a Quiet-STaR or authors' checkpoint directory, and "
                f"loading it as a Hugging Face causal LM failed ({type(err).__name__}: {err})"
            ) from err
    if tok is not None:
        model.tokenizer = tok
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()
