"""The backends of the public ops, grouped by op: ``attention/`` (thought attention) and ``lm_head/``
(``mixed_token_logprobs`` and ``sample_thought_tokens``). Each group has one module per backend
(``torch``, ``cpu``, ``triton``, ``cuda``; ``reference`` is :mod:`qstar_kernels.reference`).
:mod:`qstar_kernels.dispatch` chooses among them; a backend never imports the dispatch or the ops.
"""
