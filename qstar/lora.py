"""LoRA adapters on the base model of a :class:`~qstar.model.QuietStarForCausalLM` (the ``lora``
extra: ``pip install 'qstar-kernels[lora]'``, which brings ``peft``).

    from qstar.lora import add_lora, merge_lora
    model = build_model("tiny", method, seed=0)
    add_lora(model, r=16, alpha=32, target_modules="all-linear", base="tiny", seed=0)
    ...train...; model.save_pretrained("out")        # adapters + heads, not the base weights
    merge_lora(model); model.save_pretrained("full")  # a plain QuietStarForCausalLM directory

peft's LoRA layers are injected into the base model in place (``peft.inject_adapter_in_model``): the
Hugging Face model keeps its class, its decoder and its attention, so the attention patch
(:mod:`qstar_kernels.hf`) and the rollout run through the adapters unchanged. The base model's
weights are frozen; the adapters, the mixing head and the meta embeddings train. The LM head and the
embeddings are never adapted: the fused LM-head ops and the step inputs read their weights directly.

A LoRA model's ``save_pretrained`` directory holds, beside the usual ``quietstar_config.json``,
``quietstar_heads.safetensors`` and the tokenizer:

* ``quietstar_lora.safetensors``: the adapter weights, and the input (and untied output) embedding
  rows of the two meta tokens (they are new random rows of the base, so they are kept exactly);
* ``quietstar_lora.json``: the LoRA settings, the base model to rebuild (``--model`` as given, made
  absolute when it is a path, and the seed) and a fingerprint of the base weights, checked on load.

:func:`qstar.loading.load_model` and the trainer's ``--resume`` rebuild the base, add the adapters and
load them. ``python -m qstar.lora_merge SRC OUT`` writes the merged model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "LORA_META",
    "LORA_WEIGHTS",
    "add_lora",
    "base_fingerprint",
    "has_lora",
    "load_lora_weights",
    "merge_lora",
    "read_lora_meta",
    "require_peft",
    "save_lora_weights",
    "trainable_parameters",
]

LORA_WEIGHTS = "quietstar_lora.safetensors"
LORA_META = "quietstar_lora.json"
LORA_FORMAT = 1
ADAPTER = "default"  # peft's adapter name
_META_ROWS = ("meta_rows.input", "meta_rows.output")


def require_peft():
    """The ``peft`` module, or one ``ImportError`` line saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ImportError(
            "LoRA (--lora-r > 0) needs the peft package: pip install 'qstar-kernels[lora]' "
            "(or pip install peft)"
        ) from None
    return peft


def has_lora(model) -> bool:
    """Whether ``model`` (a QuietStarForCausalLM) carries LoRA adapters."""
    return getattr(model, "lora_info", None) is not None


def _linear_suffixes(decoder: nn.Module) -> list[str]:
    """The last name part of every ``nn.Linear`` of the decoder (``q_proj``, ..., ``down_proj``)."""
    names = {n.rsplit(".", 1)[-1] for n, m in decoder.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names)


def _targets(model, target_modules: str) -> list[str]:
    """``target_modules`` (comma-separated, or ``all-linear``) checked against the base model: each
    name must match a linear layer of the decoder, and none the LM head or the embeddings."""
    available = _linear_suffixes(model.decoder)
    wanted = [t.strip() for t in target_modules.split(",") if t.strip()]
    if wanted == ["all-linear"]:
        return available
    base = model.base_model
    read_directly = {id(base.get_output_embeddings()), id(base.get_input_embeddings())}
    for name in wanted:
        hits = [m for n, m in base.named_modules() if n == name or n.endswith("." + name)]
        if any(id(m) in read_directly for m in hits):
            raise ValueError(
                f"--lora-target-modules: {name!r} is the LM head or the embeddings, which the fused "
                f"ops read directly; expected decoder linear layers (some of {', '.join(available)}) "
                "or all-linear"
            )
        if name not in available:
            raise ValueError(
                f"--lora-target-modules: {name!r} names no linear layer of the decoder; expected some of "
                f"{', '.join(available)}, or all-linear"
            )
    return wanted


def base_fingerprint(base: nn.Module) -> str:
    """A sha256 over every base parameter's name, shape and first 64 values rounded to bf16 (so an
    fp32 and a bf16 copy agree): the base the adapters were trained on, checked on load."""
    h = hashlib.sha256()
    for name, p in sorted(base.named_parameters()):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        head = p.detach().flatten()[:64].to("cpu", torch.bfloat16).float()
        h.update(f"{name}:{tuple(p.shape)}:".encode())
        h.update(head.numpy().tobytes())
    return h.hexdigest()


def _spec(base: str | None) -> str | None:
    """``--model`` as it can be found again: a path that exists is made absolute."""
    if base is None:
        return None
    path = Path(base).expanduser()
    return str(path.resolve()) if base != "tiny" and path.exists() else base


def add_lora(
    model,
    *,
    r: int,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: str = "all-linear",
    base: str | None = None,
    seed: int = 0,
):
    """Inject LoRA adapters (rank ``r``, scale ``alpha / r``) into ``model.base_model`` in place and
    freeze the base weights; the mixing head and the meta embeddings stay trainable. ``base`` and
    ``seed`` say how to rebuild the base model (:func:`qstar.loading.build_model`) when the saved
    adapters are loaded; without ``base`` the model saves but cannot be reloaded on its own.
    The adapters start at zero (``lora_B = 0``): the model computes what it computed before;
    ``lora_A``'s random start is drawn from ``seed``."""
    peft = require_peft()
    if has_lora(model):
        raise ValueError("add_lora: the model already has LoRA adapters")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"--lora-r must be an int > 0, got {r!r}")
    targets = _targets(model, target_modules)
    fingerprint = base_fingerprint(model.base_model)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    with torch.random.fork_rng(devices=[]):  # lora_A's random init depends on the seed alone
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, model.base_model, adapter_name=ADAPTER)
    for name, p in model.base_model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.lora_info = {
        "format_version": LORA_FORMAT,
        "r": r,
        "alpha": float(alpha),
        "dropout": float(dropout),
        "target_modules": target_modules,
        "resolved_targets": targets,
        "base_model": _spec(base),
        "seed": int(seed),
        "fingerprint": fingerprint,
    }
    return model


def trainable_parameters(model) -> dict[str, int]:
    """Parameter counts: ``{"trainable": n, "total": n}``."""
    params = list(model.parameters())
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }


def _meta_rows(model) -> dict[str, torch.Tensor]:
    """The input (and, when untied, the output) embedding rows of the two meta tokens, ``(2, H)``."""
    ids = [model.start_id, model.end_id]
    E = model.base_model.get_input_embeddings().weight
    W = model.base_model.get_output_embeddings().weight
    rows = {"meta_rows.input": E[ids]}
    if W.data_ptr() != E.data_ptr():
        rows["meta_rows.output"] = W[ids]
    return rows


def _adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {"adapter." + n: p for n, p in model.base_model.named_parameters() if "lora_" in n}


def save_lora_weights(model, directory: Path) -> None:
    """Write ``quietstar_lora.safetensors`` and ``quietstar_lora.json`` into ``directory``."""
    from safetensors.torch import save_file

    tensors = {**_adapter_tensors(model), **_meta_rows(model)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(directory / LORA_WEIGHTS))
    (directory / LORA_META).write_text(json.dumps(model.lora_info, indent=2, sort_keys=True) + "\n")


def read_lora_meta(directory: Path) -> dict:
    """``quietstar_lora.json`` of a LoRA directory (one ``ValueError`` line when it is malformed)."""
    path = Path(directory) / LORA_META
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable LoRA description ({err})") from None
    need = ("format_version", "r", "alpha", "dropout", "target_modules", "base_model", "seed", "fingerprint")
    missing = [k for k in need if k not in meta]
    if missing or meta["format_version"] != LORA_FORMAT:
        raise ValueError(f"{path}: expected a format-{LORA_FORMAT} LoRA description, missing {missing}")
    if meta["base_model"] is None:
        raise ValueError(f"{path}: the adapters were saved without their base model (add_lora(base=...))")
    return meta


def load_lora_weights(model, directory: Path) -> None:
    """Load the adapters and the meta rows of ``directory`` into ``model`` (built by ``add_lora``
    with the saved settings over the saved base; the base's fingerprint must match)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_lora_meta(directory)
    if meta["fingerprint"] != model.lora_info["fingerprint"]:
        raise ValueError(
            f"{directory}: the base model {meta['base_model']!r} differs from the one these adapters were "
            "trained on (weight fingerprint mismatch)"
        )
    saved = load_file(str(directory / LORA_WEIGHTS))
    own = {**_adapter_tensors(model), **_meta_rows(model)}
    want = set(own) | ({"meta_rows.output"} & set(saved))
    if set(saved) != want:
        raise ValueError(
            f"{directory / LORA_WEIGHTS}: expected the tensors of a rank-{meta['r']} adapter on "
            f"{meta['resolved_targets']}: missing {sorted(want - set(saved))[:3]}, "
            f"unexpected {sorted(set(saved) - want)[:3]}"
        )
    ids = [model.start_id, model.end_id]
    with torch.no_grad():
        for name, p in model.base_model.named_parameters():
            if "lora_" in name:
                p.copy_(saved["adapter." + name])
        model.base_model.get_input_embeddings().weight[ids] = saved["meta_rows.input"].to(
            model.base_model.get_input_embeddings().weight.dtype
        )
        if "meta_rows.output" in saved:
            W = model.base_model.get_output_embeddings().weight
            W[ids] = saved["meta_rows.output"].to(W.dtype)


def merge_lora(model):
    """Fold the adapters into the base weights (``W + alpha/r * B A``) and remove them, in place:
    the model becomes a plain QuietStarForCausalLM whose ``save_pretrained`` writes every weight."""
    if not has_lora(model):
        raise ValueError("merge_lora: the model has no LoRA adapters")
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.base_model
    for name, module in list(base.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, module.get_base_layer())
    if hasattr(base, "peft_config"):
        del base.peft_config
    for p in base.parameters():
        p.requires_grad_(True)
    model.lora_info = None
    return model
