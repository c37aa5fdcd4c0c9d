"""Quiet-STaR, the method: config, model wrapper, training loop, generation and evaluation.

This package builds on the public ops of :mod:`qstar_kernels` and never names a backend.

    from qstar import QuietStarConfig, QuietStarForCausalLM, get_preset
    model = QuietStarForCausalLM.from_base(hf_causal_lm, tokenizer, get_preset("default").method)
    out = model(input_ids, attention_mask)   # out.loss, out.rewards, out.thought_tokens, ...
    text = qstar.generate(model, "Q: 2+3=", max_new_tokens=8).texts[0]   # thinks before each token
"""

from qstar_kernels import thought_attention

from .config import Preset, QuietStarConfig, TrainingConfig, get_preset
from .generation import GenerationOutput, GenerationStep, SamplingParams, generate, stream
from .heads import build_mixing_head
from .model import QuietStarForCausalLM, QuietStarOutput

__all__ = [
    "GenerationOutput",
    "GenerationStep",
    "Preset",
    "QuietStarConfig",
    "QuietStarForCausalLM",
    "QuietStarOutput",
    "SamplingParams",
    "TrainingConfig",
    "build_mixing_head",
    "generate",
    "get_preset",
    "stream",
    "thought_attention",
]
__version__ = "0.1.0"
