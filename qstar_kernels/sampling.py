"""``sample_thought_tokens``: thought tokens sampled from the LM head, and their log-probabilities
at the REINFORCE temperature, fused (``kernels.md`` section 3, ``quietstar.md`` section 8.1).

Shapes::

    h: (N, H)   weight: (V, H)   tokens: (N,) int64   logp: (N,) float32 (float64 for float64 h)

Randomness: one 63-bit seed per call from ``generator`` (:func:`draw_sampling_seed`); the Gumbel
noise of row ``i`` and id ``v`` is then a fixed function of ``(seed, i, v)``, defined in
:mod:`qstar_kernels.reference.sampling` and computed identically by every backend (so CPU and GPU
draw the same tokens from the same seed, up to float32 ties).
"""

from __future__ import annotations

import torch

from . import _lm_head_dispatch as _d
from .backends.lm_head_chunked import SampleThoughtTokens
from .mixing import lm_head_passes
from .reference import sample_thought_tokens_reference, thought_gumbel_noise

__all__ = ["sample_thought_tokens", "draw_sampling_seed"]

_SEED_BOUND = 2**63 - 1


def draw_sampling_seed(generator: torch.Generator | None = None, device=None) -> int:
    """The seed a call of :func:`sample_thought_tokens` with ``temperature > 0`` draws: one
    ``torch.randint(0, 2**63 - 1)`` from ``generator``, or from the default generator of ``device``
    (the device of ``h``) when ``generator`` is None. Greedy calls draw nothing."""
    dev = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
    return int(torch.randint(0, _SEED_BOUND, (), generator=generator, device=dev).item())


def _validate(h, weight, banned_ids, temperature, logprob_temperature, generator, backend):
    _d.check_matrix("h", h, "(N, H)")
    N, H = h.shape
    if H < 1:
        raise ValueError(f"h must have H >= 1 features, got shape {_d.shape_of(h)}")
    _d.check_matrix("weight", weight, "(V, H)")
    if weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(
            f"weight must have shape (V, H) with V >= 1 and H={H} (h.shape[1]), got {_d.shape_of(weight)}"
        )
    _d.check_same("weight", weight, "h", h)
    V = weight.shape[0]
    banned = None
    if banned_ids is not None:
        if isinstance(banned_ids, torch.Tensor):
            if (
                banned_ids.dtype.is_floating_point
                or banned_ids.dtype.is_complex
                or banned_ids.dtype == torch.bool
            ):
                raise TypeError(f"banned_ids must hold integer ids, got a tensor of {banned_ids.dtype}")
            if banned_ids.dim() > 1:
                raise ValueError(f"banned_ids must be 1-D, got shape {_d.shape_of(banned_ids)}")
            banned = banned_ids.detach().to("cpu", torch.int64).reshape(-1)
        elif isinstance(banned_ids, (list, tuple, range)):
            ids = [_d.as_int(f"banned_ids[{j}]", x) for j, x in enumerate(banned_ids)]
            banned = torch.tensor(ids, dtype=torch.int64)
        else:
            raise TypeError(
                "banned_ids must be None, a sequence of ints or a 1-D integer tensor, "
                f"got {type(banned_ids).__name__}"
            )
        if banned.numel():
            lo, hi = int(banned.min()), int(banned.max())
            if lo < 0 or hi >= V:
                raise ValueError(f"banned_ids must be in [0, V={V}), got {lo if lo < 0 else hi}")
            banned = torch.unique(banned)
            if banned.numel() >= V:
                raise ValueError(f"banned_ids bans all V={V} ids; nothing is left to sample")
        else:
            banned = None
    temperature = _d.as_float("temperature", temperature, "a real number >= 0")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    logprob_temperature = _d.as_float("logprob_temperature", logprob_temperature, "a real number > 0")
    if logprob_temperature <= 0:
        raise ValueError(f"logprob_temperature must be > 0, got {logprob_temperature}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    _d.check_backend_arg(backend)
    return banned, temperature, logprob_temperature


def sample_thought_tokens(
    h: torch.Tensor,
    weight: torch.Tensor,
    *,
    banned_ids=None,
    temperature: float = 1.0,
    logprob_temperature: float = 3.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
):
    """Sample one token per row from ``softmax(h @ weight.T / temperature)``, without an ``(N, V)``
    tensor, and return its log-probability at ``logprob_temperature``.

    Args:
        h: ``(N, H)`` hidden states of the thought stream.
        weight: ``(V, H)`` LM-head weight, the dtype of ``h``.
        banned_ids: ids that are never drawn and carry no probability (their logits are -inf),
            e.g. the start/end-of-thought tokens: None, a sequence of ints or a 1-D integer tensor.
        temperature: sampling temperature, ``>= 0``; 0 means greedy (argmax, the first on ties).
        logprob_temperature: the temperature of ``logp`` (3 in Quiet-STaR's REINFORCE term).
        generator: a ``torch.Generator`` for reproducible draws (one seed per call, see
            :func:`draw_sampling_seed`); None uses the default generator of ``h``'s device.
        backend: ``"reference"``, ``"torch"``, ``"cpu"``, ``"triton"`` or None (by device).

    Returns:
        ``(tokens, logp)``: ``tokens`` ``(N,)`` int64, exact Gumbel-max samples (not
        differentiable); ``logp`` ``(N,)`` float32 (float64 for float64 inputs)
        ``= log_softmax(z / logprob_temperature)[tokens]`` with banned ids excluded,
        differentiable in ``h`` and ``weight`` (first order on the fused backends).
    """
    banned, temperature, logprob_temperature = _validate(
        h, weight, banned_ids, temperature, logprob_temperature, generator, backend
    )
    chosen = _d.select_backend("sample_thought_tokens", backend, h.device, h.dtype)
    seed = 0 if temperature == 0 else draw_sampling_seed(generator, h.device)
    if chosen == "reference":
        noise = None
        if temperature != 0:
            noise = thought_gumbel_noise(seed, h.shape[0], weight.shape[0], device=h.device)
        return sample_thought_tokens_reference(
            h,
            weight,
            noise,
            banned_ids=banned,
            temperature=temperature,
            logprob_temperature=logprob_temperature,
        )
    banned_dev = None if banned is None else banned.to(h.device)
    passes = lm_head_passes(chosen)
    return SampleThoughtTokens.apply(h, weight, banned_dev, temperature, logprob_temperature, seed, passes)
