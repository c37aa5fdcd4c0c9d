"""A tiny random Mistral and a character-level tokenizer: ``--model tiny`` needs no download.

The tokenizer is a real Hugging Face ``PreTrainedTokenizerFast`` (a ``tokenizers`` WordLevel model
over single characters), so everything that takes a tokenizer takes it: ``encode``, ``decode``,
``save_pretrained``/``from_pretrained``, ``add_special_tokens``. Every printable ASCII character,
newline and tab is one token; anything else is ``<unk>``. ``"---"`` encodes to three hyphen tokens,
which is what the meta embeddings are initialised from (``docs/algorithm.md``, "Meta tokens").

    from qstar.tiny import tiny_tokenizer, tiny_mistral
    tok = tiny_tokenizer()
    lm = tiny_mistral(len(tok), seed=0)
"""

from __future__ import annotations

import string

import torch

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
CHARACTERS = string.printable[:-2]  # printable ASCII without \x0b \x0c: letters, digits, punctuation,
# space, \t, \n, \r

#: the tiny Mistral: 4 layers, hidden 128, 4 query heads over 2 key/value heads (GQA, like 7B's 32/8).
TINY_MISTRAL = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    sliding_window=None,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def tiny_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` with ``<s>`` (BOS, prepended), ``</s>``,
    ``<pad>`` and ``<unk>``; padding on the right, like the authors'."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    # Every character is its own pre-token ("[\\s\\S]" also matches newlines).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters are joined with nothing in between
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def tiny_mistral(vocab_size: int, *, seed: int = 0, **overrides):
    """A random-initialised ``MistralForCausalLM`` (SDPA attention, no sliding window), built
    under ``torch.manual_seed(seed)`` without touching the caller's RNG state."""
    from transformers import MistralConfig, MistralForCausalLM

    kwargs = dict(TINY_MISTRAL, **overrides)
    config = MistralConfig(vocab_size=vocab_size, attn_implementation="sdpa", **kwargs)
    tok = tiny_tokenizer()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MistralForCausalLM(config)
