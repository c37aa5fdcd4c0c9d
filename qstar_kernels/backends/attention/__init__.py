"""Backends of ``thought_attention``. Each module exposes ``forward(q, k, v, keep, scale, window)``
(``keep``: a contiguous bool ``(B, L)`` mask or None; ``window <= 0``: no window); the compiled
ones (``cpu``, ``triton``, ``cuda``) also ``backward`` and run behind the custom op
``qstar::thought_attention_fwd`` (:mod:`qstar_kernels.custom_ops`)."""
