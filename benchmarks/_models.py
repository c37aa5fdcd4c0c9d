"""The small Mistral the model-level benchmarks share, and the authors'-way Quiet-STaR beside ours.

``hf_rollout.py`` uses the bare Mistral; ``train_step.py`` and ``generate.py`` use :func:`qstar_pair`:
our ``QuietStarForCausalLM`` and the authors' pieces (an unpatched copy of the same language model,
the same mixing head and meta-token embeddings) for ``qstar.reference.plain_quietstar_forward``.
``real_model.py`` puts the same pieces beside a real model with :func:`authors_beside`.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import _common  # noqa: F401  (puts the checkout on sys.path when the packages are not installed)
import torch
from transformers import MistralConfig, MistralForCausalLM

from qstar import QuietStarConfig, QuietStarForCausalLM
from qstar.reference import plain_quietstar_forward
from qstar_kernels.hf import is_patched
from qstar_kernels.hf._compat import set_attn_implementation

#: 4 layers, hidden 256, 8 query / 2 key-value heads (head dim 32), MLP 896.
SMALL_MISTRAL = dict(
    num_hidden_layers=4,
    hidden_size=256,
    intermediate_size=896,
    num_attention_heads=8,
    num_key_value_heads=2,
)
#: The padding id of the Quiet-STaR benchmarks (the meta tokens are the last two ids).
PAD = 2


def small_mistral(vocab: int, *, seed: int, **config) -> MistralForCausalLM:
    """A freshly initialised small Mistral (fp32, SDPA attention, no sliding window)."""
    torch.manual_seed(seed)
    cfg = MistralConfig(
        **SMALL_MISTRAL,
        vocab_size=vocab,
        sliding_window=None,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
        **config,
    )
    return MistralForCausalLM(cfg)


class Authors(NamedTuple):
    """The authors' separate pieces: an unpatched language model, the mixing head, the meta embeddings,
    and the meta-token and padding ids."""

    lm: torch.nn.Module
    mixing_head: torch.nn.Module
    start_embedding: torch.nn.Parameter
    end_embedding: torch.nn.Parameter
    start_id: int
    end_id: int
    pad_token_id: int

    def parameters(self) -> list[torch.nn.Parameter]:
        return [
            *self.lm.parameters(),
            *self.mixing_head.parameters(),
            self.start_embedding,
            self.end_embedding,
        ]

    def forward(
        self, ids, mask, *, n_thought: int, n_talk: int, n_rationales: int, vocab: int | None = None, **kw
    ) -> dict:
        """``plain_quietstar_forward`` with ``n_ahead = n_thought + 3`` and the pieces' own meta and pad
        ids (``vocab`` is not used: the ids come from the model, see :func:`authors_beside`)."""
        return plain_quietstar_forward(
            self.lm,
            self.mixing_head,
            self.start_embedding,
            self.end_embedding,
            ids,
            mask,
            n_ahead=n_thought + 3,
            n_ahead_talk=n_talk,
            n_passes=n_rationales,
            start_id=self.start_id,
            end_id=self.end_id,
            pad_token_id=self.pad_token_id,
            **kw,
        )


def qstar_pair(
    method: QuietStarConfig, vocab: int, *, seed: int, device="cpu", **config
) -> tuple[QuietStarForCausalLM, Authors]:
    """Our model and the authors' pieces over identical weights (meta tokens = ids ``vocab``, ``vocab + 1``).

    The last mixing-head layer is random (not zero, as at initialisation), so that the mix is not the
    base model and the rewards and the policy term are live.
    """
    base = small_mistral(vocab, seed=seed, **config)
    base.resize_token_embeddings(vocab + 2, mean_resizing=False)
    base = base.to(device)
    ours = QuietStarForCausalLM(base, method, start_id=vocab, end_id=vocab + 1, pad_token_id=PAD)
    ours.init_meta_embeddings(12)
    with torch.no_grad():
        ours.mixing_head[-1].weight.normal_(0, 0.02)
    return ours, authors_beside(ours)


def authors_beside(ours: QuietStarForCausalLM) -> Authors:
    """The authors' pieces over copies of ``ours``' weights: its language model copied and switched
    back to transformers' SDPA (the copy would carry the patch; the authors' dense masks go through
    plain SDPA), its mixing head and meta embeddings copied, its meta and pad ids."""
    lm = copy.deepcopy(ours.base_model)
    set_attn_implementation(lm, "sdpa")
    if is_patched(lm):
        raise RuntimeError("authors_beside: the copied language model is still patched")
    return Authors(
        lm,
        copy.deepcopy(ours.mixing_head),
        torch.nn.Parameter(ours.start_embedding.detach().clone()),
        torch.nn.Parameter(ours.end_embedding.detach().clone()),
        ours.start_id,
        ours.end_id,
        ours.pad_token_id,
    )
