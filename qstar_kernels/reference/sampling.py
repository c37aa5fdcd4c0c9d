"""Thought-token sampling from the LM head, the executable specification (``docs/kernels.md``,
"Contract: thought-token sampling").

::

    z      = h @ weight.T, with the banned ids at -inf                  # (N, V), materialised here
    tokens = argmax(z / temperature + G)    (temperature > 0)           # Gumbel-max: exact sampling
           = argmax(z)                       (temperature == 0, greedy)
    logp   = log_softmax(z / logprob_temperature)[tokens]

``G`` is Gumbel noise, passed in explicitly so that every fused backend can be compared with this
function token for token.

The noise every backend draws (the definition lives here, in :func:`thought_gumbel_noise`)
----------------------------------------------------------------------------------------------
A call draws one 63-bit ``seed`` from the caller's generator (see
``qstar_kernels.sampling.draw_sampling_seed``). The noise of row ``i`` (0-based, in the call) and
vocabulary id ``v`` is then a pure function of ``(seed, i, v)``, so that it does not depend on how
a backend splits the work into chunks, nor on the device:

1. Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) with key
   ``(seed mod 2**32, seed // 2**32)`` and counter ``(v // 4, i, 0, 0)`` gives four 32-bit words;
   word ``v % 4`` belongs to ``v``.
2. Its top 23 bits ``k`` give the uniform ``u = (2k + 1) / 2**24``, exact in float32 and strictly
   inside (0, 1), so no id is ever excluded or forced by ``log(0)``.
3. ``G = -log(-log(u))`` in float32 (between -2.81 and 16.64).

Backends compute step 3 with their own float32 ``log`` (within an ulp or two of this one), so two
backends can disagree only where two candidates' keys ``z / T + G`` are within a few float32 ulps
of each other.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "PHILOX_ROUND_MULTIPLIERS",
    "PHILOX_KEY_INCREMENTS",
    "philox4x32_10",
    "thought_gumbel_noise",
    "sample_thought_tokens_reference",
]

#: Philox4x32 constants (the published ones).
PHILOX_ROUND_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
PHILOX_KEY_INCREMENTS = (0x9E3779B9, 0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Ten Philox4x32 rounds on uint32-valued NumPy arrays (any shape, broadcast), key ``(k0, k1)``.

    Returns the four output words as uint64 arrays holding 32-bit values.
    """
    c = [np.asarray(x, dtype=np.uint64) & _MASK32 for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0 & 0xFFFFFFFF), np.uint64(k1 & 0xFFFFFFFF)
    m0, m1 = (np.uint64(m) for m in PHILOX_ROUND_MULTIPLIERS)
    for _ in range(10):
        p0 = m0 * c[0]  # < 2**64: a full 32 x 32 -> 64 bit product, no wrap-around
        p1 = m1 * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ k0,
            p1 & _MASK32,
            (p0 >> np.uint64(32)) ^ c[3] ^ k1,
            p0 & _MASK32,
        ]
        k0 = (k0 + np.uint64(PHILOX_KEY_INCREMENTS[0])) & _MASK32
        k1 = (k1 + np.uint64(PHILOX_KEY_INCREMENTS[1])) & _MASK32
    return c


def thought_gumbel_noise(
    seed: int, n_rows: int, vocab_size: int, *, row_offset: int = 0, device=None
) -> torch.Tensor:
    """The ``(n_rows, vocab_size)`` float32 Gumbel noise of rows ``row_offset ...`` for ``seed``,
    exactly as defined in this module's docstring. Slow (NumPy), for tests and small shapes."""
    if not (0 <= seed < 2**63):
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    v = np.arange(vocab_size, dtype=np.uint64)[None, :]  # (1, V)
    i = np.arange(row_offset, row_offset + n_rows, dtype=np.uint64)[:, None]  # (n, 1)
    zero = np.zeros((1, 1), dtype=np.uint64)
    words = philox4x32_10(v >> np.uint64(2), i, zero, zero, seed & 0xFFFFFFFF, seed >> 32)
    lane = (v & np.uint64(3)).astype(np.int64)  # (1, V)
    x = np.choose(
        np.broadcast_to(lane, (n_rows, vocab_size)), [np.broadcast_to(w, (n_rows, vocab_size)) for w in words]
    )
    k = (x >> np.uint64(9)).astype(np.float32)  # 23 bits, exact in float32
    u = torch.from_numpy((k * np.float32(2.0) + np.float32(1.0)) * np.float32(2.0**-24))
    g = -torch.log(-torch.log(u))
    return g.to(device) if device is not None else g


def sample_thought_tokens_reference(
    h: torch.Tensor,
    weight: torch.Tensor,
    gumbel_noise: torch.Tensor | None,
    *,
    banned_ids=None,
    temperature: float = 1.0,
    logprob_temperature: float = 3.0,
):
    """``(tokens (N,) int64, logp (N,))``: Gumbel-max samples with the given ``(N, V)`` noise
    (unused, and may be None, at ``temperature == 0``), and their log-probabilities at
    ``logprob_temperature``. float32 math (float64 for float64 inputs); ``logp`` is differentiable
    through autograd in ``h`` and ``weight``."""
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    z = h.to(dtype) @ weight.to(dtype).T  # (N, V)
    if banned_ids is not None:
        banned = torch.as_tensor(banned_ids, dtype=torch.long, device=z.device).reshape(-1)
        z = z.index_fill(1, banned, float("-inf"))
    with torch.no_grad():
        if temperature == 0:
            tokens = z.argmax(dim=-1)
        else:
            tokens = (z / temperature + gumbel_noise.to(z.device, dtype)).argmax(dim=-1)
    logp = torch.log_softmax(z / logprob_temperature, dim=-1).gather(1, tokens[:, None])[:, 0]
    # A row with a NaN (or +inf, or no finite logit) has no maximum, and argmax could name a banned
    # id: its logp is NaN, and its token is the smallest id that is not banned, on every backend.
    allowed = torch.ones(z.shape[1], dtype=torch.bool, device=z.device)
    if banned_ids is not None:
        allowed[banned] = False
    tokens = torch.where(torch.isnan(logp.detach()), allowed.int().argmax(), tokens)
    return tokens, logp
