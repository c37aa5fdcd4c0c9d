"""The one support module for tiny models and tokenizers in the tests, built on :mod:`qstar.tiny`.

* :func:`tiny_tokenizer` is ``qstar.tiny``'s character tokenizer (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2,
  ``<unk>`` 3, then one id per printable ASCII character), the one ``--model tiny`` uses.
* :func:`tiny_lm` builds a random causal LM of any architecture the patch supports (Mistral,
  Llama, Qwen2) from ``qstar.tiny.TINY_MISTRAL``, smaller by default (hidden 32, 2 layers, GQA 4/2)
  so that float64 tests stay fast. It builds the config here rather than through
  ``qstar.tiny.tiny_mistral``, which makes Mistral only and sets the token ids from the tokenizer.
* :func:`tiny_quietstar` wraps one in :class:`~qstar.QuietStarForCausalLM` with a non-zero mixing
  head; :func:`text_batch` and :func:`random_thoughts` make inputs for it.
"""

from __future__ import annotations

import torch

from qstar import QuietStarConfig, QuietStarForCausalLM
from qstar.tiny import TINY_MISTRAL, tiny_tokenizer

__all__ = [
    "FIRST_CHAR_ID",
    "random_thoughts",
    "text_batch",
    "tiny_lm",
    "tiny_mistral",
    "tiny_quietstar",
    "tiny_tokenizer",
]

#: the first id of a real character in :func:`tiny_tokenizer` (below: pad, bos, eos, unk).
FIRST_CHAR_ID = 4

_ARCHITECTURES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}),
}


def tiny_lm(
    vocab_size: int,
    *,
    arch: str = "mistral",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **config,
):
    """A random-initialised causal LM (SDPA attention, no sliding window), built under
    ``torch.manual_seed(seed)`` without touching the caller's RNG state. ``config`` overrides any
    field of the transformers config (e.g. ``pad_token_id``, ``initializer_range``)."""
    import transformers

    if arch not in _ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(_ARCHITECTURES)}, got {arch!r}")
    config_name, model_name, arch_defaults = _ARCHITECTURES[arch]
    fields = dict(TINY_MISTRAL)
    fields.update(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    if arch != "mistral":
        fields.pop("sliding_window")
    fields.update(arch_defaults)
    fields.update(config)
    cfg = getattr(transformers, config_name)(vocab_size=vocab_size, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(cfg)
    return model.to(dtype)


def tiny_mistral(vocab_size: int, **kwargs):
    """:func:`tiny_lm` with ``arch="mistral"``."""
    return tiny_lm(vocab_size, arch="mistral", **kwargs)


def tiny_quietstar(config: QuietStarConfig | None = None, *, seed=0, nonzero_head=True, **model_kw):
    """A QuietStarForCausalLM over a tiny LM and the tiny tokenizer; the mixing head's last layer
    made non-zero (with the authors' zero init every reward is exactly 0)."""
    tok = tiny_tokenizer()
    base = tiny_lm(len(tok), seed=seed, **model_kw)
    config = config or QuietStarConfig(n_thought_tokens=3, n_talk_tokens=2, n_rationales=2)
    model = QuietStarForCausalLM.from_base(base, tok, config)
    if nonzero_head:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed + 1)
            last = model.mixing_head[-1].weight
            last.copy_(torch.randn(last.shape, generator=gen) * 0.5)
    return model


def text_batch(B: int, L: int, *, pad_last: int = 0, seed: int = 0, low: int = FIRST_CHAR_ID, high: int = 32):
    """(input_ids, attention_mask): random character ids (never a special id), row 1 right-padded
    with the pad id 0 over its last ``pad_last`` positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad_last and B > 1:
        ids[1, L - pad_last :] = tiny_tokenizer().pad_token_id
        mask[1, L - pad_last :] = 0
    return ids, mask


def random_thoughts(model: QuietStarForCausalLM, rows: int, L: int, *, seed: int = 0, n=None):
    """Injected thought tokens (n_thought_tokens, rows, L), never a meta token."""
    gen = torch.Generator().manual_seed(seed)
    n = model.config.n_thought_tokens if n is None else n
    return torch.randint(FIRST_CHAR_ID, model.start_id, (n, rows, L), generator=gen)
