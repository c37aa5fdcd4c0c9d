"""Saving and loading a :class:`~qstar.model.QuietStarForCausalLM`: its own directory format and the
authors' released layout.

:class:`PretrainedIO` is a mixin: the model class inherits ``save_pretrained``, ``from_pretrained``,
``from_authors_checkpoint`` and the head state dict from it. It needs only what the model has
(``base_model``, ``tokenizer``, ``config``, the meta embeddings and ``mixing_head``) and builds
through ``cls(base, config, start_id=..., end_id=..., pad_token_id=..., tokenizer=...)``, so this
module never imports :mod:`qstar.model`.

A directory written by :meth:`PretrainedIO.save_pretrained` holds the base model in Hugging Face
format, the tokenizer, ``quietstar_heads.safetensors`` (meta embeddings and mixing head) and
``quietstar_config.json`` (the method config and the meta token ids); a model with LoRA adapters
writes them (:mod:`qstar.lora`) instead of the base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import QuietStarConfig
from .lora import LORA_META

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "HEADS_NAME", "PretrainedIO", "load_tokenizer", "read_state_dict"]

CONFIG_NAME = "quietstar_config.json"
HEADS_NAME = "quietstar_heads.safetensors"
FORMAT_VERSION = 1


class PretrainedIO:
    """Save/load for the Quiet-STaR wrapper (a mixin of :class:`~qstar.model.QuietStarForCausalLM`)."""

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that are not the base model's: the meta embeddings and the mixing head."""
        sd = {"start_embedding": self.start_embedding, "end_embedding": self.end_embedding}
        sd.update({f"mixing_head.{k}": v for k, v in self.mixing_head.state_dict().items()})
        return {k: v.detach().contiguous() for k, v in sd.items()}

    def load_heads_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy the meta embeddings and the mixing head from ``sd`` (the keys of :meth:`heads_state_dict`)."""
        want = set(self.heads_state_dict())
        if set(sd) != want:
            raise ValueError(
                f"head weights: expected keys {sorted(want)}, missing {sorted(want - set(sd))}, "
                f"unexpected {sorted(set(sd) - want)}"
            )
        with torch.no_grad():
            self.start_embedding.copy_(sd["start_embedding"])
            self.end_embedding.copy_(sd["end_embedding"])
            self.mixing_head.load_state_dict(
                {k.removeprefix("mixing_head."): v for k, v in sd.items() if k.startswith("mixing_head.")}
            )

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Write the base model (HF format), the tokenizer (if any), the heads and the config. With
        LoRA adapters (:mod:`qstar.lora`) the adapters take the base model's place."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        if getattr(self, "lora_info", None) is not None:
            from .lora import save_lora_weights

            save_lora_weights(self, out)
        else:
            self.base_model.save_pretrained(out, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        save_file({k: v.cpu() for k, v in self.heads_state_dict().items()}, str(out / HEADS_NAME))
        meta = {
            "format_version": FORMAT_VERSION,
            "quietstar": self.config.to_dict(),
            "start_id": self.start_id,
            "end_id": self.end_id,
            "pad_token_id": self.pad_token_id,
        }
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, config: QuietStarConfig | None = None, **model_kwargs):
        """Load what :meth:`save_pretrained` wrote. ``config`` overrides the saved method config
        (the head shape must match); ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained``."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        directory = Path(directory)
        meta_path = directory / CONFIG_NAME
        if not meta_path.exists():
            raise FileNotFoundError(
                f"{meta_path} not found: not a QuietStarForCausalLM directory (for the authors' "
                "checkpoints use QuietStarForCausalLM.from_authors_checkpoint)"
            )
        if (directory / LORA_META).is_file():
            raise ValueError(
                f"{directory} holds LoRA adapters, not a base model: load it with qstar.loading.load_model "
                "(which rebuilds the base), or merge it first (python -m qstar.lora_merge)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        config = config or QuietStarConfig.from_dict(meta["quietstar"])
        model_kwargs.setdefault("attn_implementation", "sdpa")
        base = AutoModelForCausalLM.from_pretrained(directory, **model_kwargs)
        tokenizer = load_tokenizer(directory)
        model = cls(
            base,
            config,
            start_id=meta["start_id"],
            end_id=meta["end_id"],
            pad_token_id=meta["pad_token_id"],
            tokenizer=tokenizer,
        )
        model.load_heads_state_dict(load_file(str(directory / HEADS_NAME)))
        return model

    @classmethod
    def from_authors_checkpoint(
        cls, directory: str | Path, *, config: QuietStarConfig | None = None, tokenizer=None, dtype=None
    ):
        """Load the authors' released layout (e.g. ``ezelikman/quietstar-8-ahead``, downloaded).

        Their checkpoint is a Mistral state dict with extra keys: ``start_embedding``,
        ``end_embedding`` (each ``(2, H)``, stored divided by the embedding scale) and the mixing head
        ``talk_head.0.{0,2,4}.*``. Their own loader then overwrites the meta embeddings on the first
        forward (``docs/method.md``, "Loading the authors' checkpoint"); this converter keeps the
        trained values.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        directory = Path(directory)
        state = read_state_dict(directory)
        extras = {
            k: state.pop(k)
            for k in list(state)
            if k in ("start_embedding", "end_embedding") or k.startswith("talk_head.")
        }
        missing = [k for k in ("start_embedding", "end_embedding") if k not in extras]
        if missing or not any(k.startswith("talk_head.0.") for k in extras):
            raise ValueError(
                f"{directory}: not the authors' Quiet-STaR layout (missing {missing or 'talk_head.0.*'}); "
                "expected start_embedding, end_embedding and talk_head.0.* next to the Mistral weights"
            )
        hf_config = AutoConfig.from_pretrained(directory)
        hf_config._attn_implementation = "sdpa"
        base = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
        if dtype is not None:
            base = base.to(dtype)
        result = base.load_state_dict(state, strict=False)
        unexpected = list(result.unexpected_keys)
        missing_base = [k for k in result.missing_keys if k not in getattr(base, "_tied_weights_keys", {})]
        if unexpected or missing_base:
            raise ValueError(
                f"{directory}: base weights do not fit: missing {missing_base}, unexpected {unexpected}"
            )
        n_linear = len({int(k.split(".")[2]) for k in extras if k.startswith("talk_head.0.")})
        inferred = (
            QuietStarConfig(n_thought_tokens=max(1, int(getattr(hf_config, "n_ahead", 8)) - 3))
            if config is None
            else config
        )
        if inferred.mixing_head_layers != n_linear:
            raise ValueError(
                f"{directory}: the checkpoint's mixing head has {n_linear} linear layers, the config "
                f"{inferred.mixing_head_layers}"
            )
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(directory)
        vocab = base.get_output_embeddings().weight.shape[0]
        start_id, end_id = _authors_meta_ids(directory, tokenizer, inferred, vocab)
        pad = getattr(hf_config, "pad_token_id", None)
        if tokenizer is not None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            pad = getattr(hf_config, "eos_token_id", 2)
        model = cls(
            base, inferred, start_id=start_id, end_id=end_id, pad_token_id=int(pad), tokenizer=tokenizer
        )
        heads = {"start_embedding": extras["start_embedding"], "end_embedding": extras["end_embedding"]}
        heads.update(
            {
                f"mixing_head.{k.removeprefix('talk_head.0.')}": v
                for k, v in extras.items()
                if k.startswith("talk_head.0.")
            }
        )
        model.load_heads_state_dict(heads)
        return model


def _authors_meta_ids(directory: Path, tokenizer, config: QuietStarConfig, vocab: int) -> tuple[int, int]:
    """The ids of ``<|startthought|>`` / ``<|endthought|>`` for the authors' checkpoint: the last two
    vocabulary rows, added to a base tokenizer that lacks them."""
    if tokenizer is None:
        return vocab - 2, vocab - 1
    names = [config.start_token, config.end_token]
    ids = tokenizer.convert_tokens_to_ids(names)
    unk = getattr(tokenizer, "unk_token_id", None)
    if any(i is None or i == unk for i in ids) and len(tokenizer) == vocab - 2:
        # A base tokenizer without the meta tokens (e.g. Mistral's own): add them; they become the
        # last two ids, which is where the checkpoint keeps them.
        tokenizer.add_special_tokens({"additional_special_tokens": names})
        ids = tokenizer.convert_tokens_to_ids(names)
    if any(i is None or i == unk for i in ids):
        raise ValueError(
            f"{directory}: the tokenizer has no {config.start_token!r} / {config.end_token!r} "
            f"tokens and {len(tokenizer)} tokens for a vocabulary of {vocab}: pass the tokenizer "
            "the checkpoint was trained with"
        )
    start_id, end_id = ids
    return start_id, end_id


def load_tokenizer(directory: Path):
    """``AutoTokenizer.from_pretrained(directory)``, or None when the directory holds no tokenizer."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((directory / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors (single or sharded) or pytorch_model*.bin."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    files = [f for f in files if f.name != HEADS_NAME]
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin weights found")
