"""Backends of the LM-head ops (``mixed_token_logprobs``, ``sample_thought_tokens``): each module
supplies the passes (:class:`~qstar_kernels.backends.lm_head.base.LMHeadPasses`) that the tiled
algorithm of :mod:`qstar_kernels.lm_head_tiled` runs."""
