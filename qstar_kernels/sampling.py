"""``sample_thought_tokens``: thought tokens sampled from the LM head, and their log-probabilities
at the REINFORCE temperature, fused (``docs/kernels.md``, "Contract: thought-token sampling";
``docs/algorithm.md``, "The policy loss (REINFORCE)"). The backend comes from
:mod:`qstar_kernels.dispatch`; the fused backends run the tiled algorithm behind the custom op
``qstar::sample_thought_tokens_fwd``.

Shapes::

    h: (N, H)   weight: (V, H)   tokens: (N,) int64   logp: (N,) float32 (float64 for float64 h)

Randomness: one 63-bit seed per call from ``generator`` (:func:`draw_sampling_seed`); the Gumbel
noise of row ``i`` and id ``v`` is then a fixed function of ``(seed, i, v)``, defined in
:mod:`qstar_kernels.reference.sampling` and computed identically by every backend (so CPU and GPU
draw the same tokens from the same seed, up to float32 ties).
"""

from __future__ import annotations

import torch

from . import _checks as _c
from . import custom_ops, dispatch
from .reference import sample_thought_tokens_reference, thought_gumbel_noise

__all__ = ["sample_thought_tokens", "draw_sampling_seed"]

_SEED_BOUND = 2**63 - 1


def draw_sampling_seed(generator: torch.Generator | None = None, device=None) -> int:
    """The seed a call of :func:`sample_thought_tokens` with ``temperature > 0`` draws: one
    ``torch.randint(0, 2**63 - 1)`` from ``generator``, or from the default generator of ``device``
    (the device of ``h``) when ``generator`` is None. Greedy calls draw nothing."""
    return int(_seed_tensor(generator, device).item())


def _seed_tensor(generator: torch.Generator | None, device) -> torch.Tensor:
    """The seed of :func:`draw_sampling_seed` as a 0-d int64 tensor (no ``.item()``: traceable)."""
    dev = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
    return torch.randint(0, _SEED_BOUND, (), generator=generator, device=dev)


def _validate(h, weight, banned_ids, temperature, logprob_temperature, generator, backend):
    _c.check_matrix("h", h, "(N, H)")
    N, H = h.shape
    if H < 1:
        raise ValueError(f"h must have H >= 1 features, got shape {_c.shape_of(h)}")
    _c.check_matrix("weight", weight, "(V, H)")
    if weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(
            f"weight must have shape (V, H) with V >= 1 and H={H} (h.shape[1]), got {_c.shape_of(weight)}"
        )
    _c.check_same("weight", weight, "h", h)
    banned = None  # int64 ids, kept on the CPU: their values are checked on the CPU (banned_id_set)
    if banned_ids is not None:
        if isinstance(banned_ids, torch.Tensor):
            if (
                banned_ids.dtype.is_floating_point
                or banned_ids.dtype.is_complex
                or banned_ids.dtype == torch.bool
            ):
                raise TypeError(f"banned_ids must hold integer ids, got a tensor of {banned_ids.dtype}")
            if banned_ids.dim() > 1:
                raise ValueError(f"banned_ids must be 1-D, got shape {_c.shape_of(banned_ids)}")
            banned = banned_ids.detach().to(torch.int64).reshape(-1)
        elif isinstance(banned_ids, (list, tuple, range)):
            ids = [_c.as_int(f"banned_ids[{j}]", x) for j, x in enumerate(banned_ids)]
            banned = torch.tensor(ids, dtype=torch.int64)
        else:
            raise TypeError(
                "banned_ids must be None, a sequence of ints or a 1-D integer tensor, "
                f"got {type(banned_ids).__name__}"
            )
    temperature = _c.as_float("temperature", temperature, "a real number >= 0")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    logprob_temperature = _c.as_float("logprob_temperature", logprob_temperature, "a real number > 0")
    if logprob_temperature <= 0:
        raise ValueError(f"logprob_temperature must be > 0, got {logprob_temperature}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    _c.check_backend_arg(backend)
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
        differentiable in ``h`` and ``weight`` (first order on the fused backends). A row whose
        logits hold a NaN (or +inf, or no finite value) has ``logp`` NaN and the smallest id that
        is not banned as its token, on every backend: a banned id is never returned.
    """
    banned, temperature, logprob_temperature = _validate(
        h, weight, banned_ids, temperature, logprob_temperature, generator, backend
    )
    if not torch.compiler.is_compiling():
        # Eagerly, the values are checked before anything runs or the generator advances; a compiled
        # graph cannot branch on them, and the op checks them itself (on this CPU copy: no sync).
        banned = _c.banned_id_set(banned, weight.shape[0])
    chosen = dispatch.select_backend("sample_thought_tokens", backend, h.device, h.dtype)
    if chosen == "reference":
        banned = _c.banned_id_set(banned, weight.shape[0])
        seed = 0 if temperature == 0 else draw_sampling_seed(generator, h.device)
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
    # Greedy calls draw nothing (the generator's state is left as it was).
    seed = torch.zeros((), dtype=torch.int64) if temperature == 0 else _seed_tensor(generator, h.device)
    logp, tokens, _ = custom_ops.sample_thought_tokens_fwd(
        h, weight, banned, seed, temperature, logprob_temperature, chosen
    )
    return tokens, logp
