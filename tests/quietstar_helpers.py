"""Tiny Quiet-STaR models for tests: a character tokenizer and a random Mistral, built in milliseconds."""

from __future__ import annotations

import torch

from qstar import QuietStarConfig, QuietStarForCausalLM

CHARS = list("0123456789+-=*() \nabcdefghij")


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def tiny_mistral(vocab_size: int, *, hidden=32, layers=2, heads=4, kv_heads=2, dtype=torch.float32, seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        sliding_window=None,
        attn_implementation="sdpa",
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    return MistralForCausalLM(cfg).to(dtype)


def tiny_quietstar(config: QuietStarConfig | None = None, *, seed=0, nonzero_head=True, **model_kw):
    """A QuietStarForCausalLM over a tiny Mistral; the mixing head's last layer made non-zero."""
    tok = char_tokenizer()
    base = tiny_mistral(len(tok), seed=seed, **model_kw)
    config = config or QuietStarConfig(n_thought_tokens=3, n_talk_tokens=2, n_rationales=2)
    model = QuietStarForCausalLM.from_base(base, tok, config)
    if nonzero_head:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed + 1)
            last = model.mixing_head[-1].weight
            last.copy_(torch.randn(last.shape, generator=gen) * 0.5)
    return model


def text_batch(B: int, L: int, *, pad_last: int = 0, seed: int = 0, low: int = 3, high: int = 31):
    """(input_ids, attention_mask): random real ids (never the pad id 2), row 1 right-padded."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, high, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad_last and B > 1:
        ids[1, L - pad_last :] = 2
        mask[1, L - pad_last :] = 0
    return ids, mask


def random_thoughts(model: QuietStarForCausalLM, rows: int, L: int, *, seed: int = 0, n=None):
    """Injected thought tokens (n_thought_tokens, rows, L), never a meta token."""
    gen = torch.Generator().manual_seed(seed)
    n = model.config.n_thought_tokens if n is None else n
    return torch.randint(3, model.start_id, (n, rows, L), generator=gen)
