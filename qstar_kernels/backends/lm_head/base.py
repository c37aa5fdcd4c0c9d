"""What an LM-head backend supplies: the three passes over the logit tiles (:class:`LMHeadPasses`),
and the Python tile loop (:class:`TiledPasses`) that the ``torch``, ``triton`` and ``cuda`` backends
build on with their own row kernels (the ``cpu`` backend runs each pass in C++). The algorithm that
calls the passes is :mod:`qstar_kernels.lm_head_tiled`.

The logits ``z = h @ weight.T`` are computed one tile at a time, ``rows x cols`` (a block of rows
times a block of vocabulary ids), into a reused buffer, so the extra memory is a tile (per thread)
plus ``O(N)`` row statistics, never ``(N, V)``. The vocabulary blocks are the outer loop: a block
of the weight (and of its gradient) stays in cache while the row blocks stream past it.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

__all__ = [
    "LMHeadPasses",
    "TiledPasses",
    "Tiling",
    "tiling_override",
    "choose_tiling",
    "acc_dtype",
    "dtypes",
    "POISON",
]

_NEG_INF = float("-inf")

#: Test mode: fill every buffer the Python tile loop allocates (and each tile output before a
#: kernel writes it) with NaN (float) or -7 (int), so that a test can prove that the kernels write
#: every element. (The C++ passes have their own switch, ``_C.lm_head_set_poison``.)
POISON = False


@dataclasses.dataclass(frozen=True)
class Tiling:
    """A tile shape; the defaults are attributes of each backend's passes (cpu_tile, gpu_tile)."""

    rows: int  # rows per tile
    cols: int  # vocabulary ids per tile: a multiple of 4, or all of V


_override: Tiling | None = None


@contextlib.contextmanager
def tiling_override(rows: int, cols: int):
    """Force a tile shape (tests use tiny tiles to exercise the merges across tiles)."""
    global _override
    old, _override = _override, Tiling(rows, cols)
    try:
        yield
    finally:
        _override = old


def choose_tiling(n_rows: int, vocab: int, device: torch.device, passes: LMHeadPasses) -> Tiling:
    if _override is not None:
        rows, cols = _override.rows, _override.cols
    else:
        rows, cols = passes.gpu_tile if device.type == "cuda" else passes.cpu_tile
    rows = max(1, min(rows, n_rows))
    cols = vocab if cols >= vocab else max(4, cols - cols % 4)
    return Tiling(rows, cols)


def _empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        _poison(t)
    return t


def _poison(t: torch.Tensor) -> None:
    if POISON:
        t.fill_(float("nan") if t.is_floating_point() else -7)


def dtypes(x: torch.Tensor, passes: LMHeadPasses) -> tuple[torch.dtype, torch.dtype]:
    """(accumulation dtype, GEMM/tile dtype) for inputs of x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gemm = x.dtype if (passes.lowp_gemm and x.dtype in (torch.float16, torch.bfloat16)) else acc
    return acc, gemm


def _acc_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b (out may be wider than a and b)."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out.add_(torch.mm(a, b))


class _Tiles:
    """Iterates the tiles of an (n, V) product, vocabulary blocks outer, and owns the buffer."""

    def __init__(self, n, vocab, dtype, device, banned: torch.Tensor | None, passes: LMHeadPasses):
        self.tiling = choose_tiling(n, vocab, device, passes)
        self.n, self.vocab, self.device = n, vocab, device
        self.buf = _empty((self.tiling.rows * self.tiling.cols,), dtype, device)
        # The banned ids, sorted, on the CPU (a handful): each vocabulary block takes its own.
        self.banned = None if banned is None else torch.sort(banned.cpu()).values

    def vocab_blocks(self):
        """(v0, v1, the banned ids of [v0, v1) relative to v0 on the device, or None)."""
        for v0 in range(0, self.vocab, self.tiling.cols):
            v1 = min(self.vocab, v0 + self.tiling.cols)
            banned = None
            if self.banned is not None:
                ids = self.banned[(self.banned >= v0) & (self.banned < v1)]
                if ids.numel():
                    banned = (ids - v0).to(self.device)
            yield v0, v1, banned

    def row_blocks(self):
        for r0 in range(0, self.n, self.tiling.rows):
            yield r0, min(self.n, r0 + self.tiling.rows)

    def logits(self, h_rows: torch.Tensor, w_block: torch.Tensor, banned) -> torch.Tensor:
        r, c = h_rows.shape[0], w_block.shape[0]
        z = self.buf[: r * c].view(r, c)
        torch.mm(h_rows, w_block.T, out=z)
        if banned is not None:
            z.index_fill_(1, banned, _NEG_INF)
        return z


class LMHeadPasses:
    """The three passes a backend supplies. ``h`` ``(n, H)`` and ``weight`` ``(V, H)`` come
    contiguous in the GEMM dtype; row statistics are in the accumulation dtype (float32, or float64
    for float64 inputs).

    * ``lse_pass(h, weight)``: ``lse[i] = logsumexp(z[i])``; NaN for a row with a NaN or +inf logit.
    * ``sample_pass(h, weight, banned, inv_t, lp_scale, seed)``: with the banned ids at -inf,
      ``tokens[i]`` = the first argmax of ``z[i] * inv_t + G(seed, i, .)`` (of ``z[i]`` when
      ``inv_t == 0``) and ``lse[i] = logsumexp(z[i] * lp_scale)``; returns ``(tokens, lse)``.
    * ``grad_pass(h, weight, banned, lse, index, coef, scale, need_h, need_w)``: ``(grad_h,
      grad_weight)`` (None where not needed) of ``sum_i coef[i] / scale * (z[i, index[i]] * scale
      - lse[i])``.

    ``lowp_gemm``: compute the GEMMs (and tiles) in float16/bfloat16 for such inputs (the GPU
    path); otherwise in the accumulation dtype.
    """

    name = "?"
    lowp_gemm = False
    # Default tiles (rows, vocabulary ids). The Python tile loop wants big tiles (few calls; 16 MiB
    # of float32 on a CPU); on a GPU each cuBLAS call and kernel launch needs plenty of work
    # (untuned: no GPU was available to tune them).
    cpu_tile = (1024, 4096)
    gpu_tile = (2048, 16384)

    def lse_pass(self, h, weight):
        raise NotImplementedError

    # The mixing prologue and epilogue and the target gather of mixed_token_logprobs; a backend
    # may run them in its own kernels (cpu, cuda), by default plain PyTorch ops.
    def mix(self, h_base, h_thought, w, dtype):
        """``(1 - w) h_base + w h_thought`` (rows already selected) in ``dtype``."""
        wc = w.reshape(-1, 1).to(dtype)
        return (1 - wc) * h_base.to(dtype) + wc * h_thought.to(dtype)

    def mix_backward(self, grad_h, h_base, h_thought, w):
        """From ``grad_h`` (N, H) of the mixed state (accumulation dtype): ``(grad_h_base,
        grad_h_thought, grad_w (N,))`` in that dtype."""
        wc = w.reshape(-1, 1).to(grad_h.dtype)
        diff = h_thought.to(grad_h.dtype) - h_base.to(grad_h.dtype)
        return (1 - wc) * grad_h, wc * grad_h, (grad_h * diff).sum(-1)

    def target_logits(self, h, weight, target):
        """``h[i] . weight[target[i]]`` in ``h``'s dtype (the accumulation dtype)."""
        return (h * weight.index_select(0, target).to(h.dtype)).sum(-1)

    def sample_pass(self, h, weight, banned, inv_t, lp_scale, seed):
        raise NotImplementedError

    def grad_pass(self, h, weight, banned, lse, index, coef, scale, need_h, need_w):
        raise NotImplementedError


class TiledPasses(LMHeadPasses):
    """The passes as a Python loop over tiles; a backend supplies three row kernels over a
    contiguous ``(r, c)`` tile ``z`` (the GEMMs go through ``torch.mm``):

    * ``lse_rows(z, scale, out)``: ``out[i] = logsumexp(z[i] * scale)`` (NaN for a NaN or +inf,
      -inf for a row of -inf only: banned ids are -inf).
    * ``sample_rows(z, inv_t, lp_scale, seed, row0, v0, tokens, keys, lse)``: ``lse`` as above at
      ``lp_scale``; ``tokens[i] = v0 +`` the first argmax of ``z[i] * inv_t + G(seed, row0 + i,
      v0 + j)`` (of ``z[i]`` when ``inv_t == 0``), ``keys[i]`` its key.
    * ``grad_rows_(z, lse, index, coef, scale)``: in place ``z[i] <- coef[i] * (onehot(index[i]) -
      exp(z[i] * scale - lse[i]))``; ``index`` relative to the tile (outside it: no one-hot).
    """

    def lse_rows(self, z, scale, out):
        raise NotImplementedError

    def sample_rows(self, z, inv_t, lp_scale, seed, row0, v0, tokens, keys, lse):
        raise NotImplementedError

    def grad_rows_(self, z, lse, index, coef, scale):
        raise NotImplementedError

    def lse_pass(self, h, weight):
        n, V = h.shape[0], weight.shape[0]
        acc = acc_dtype(h)
        lse = torch.full((n,), _NEG_INF, dtype=acc, device=h.device)
        if n == 0:
            return lse
        tiles = _Tiles(n, V, h.dtype, h.device, None, self)
        lse_blk = _empty((tiles.tiling.rows,), acc, h.device)
        for v0, v1, _ in tiles.vocab_blocks():
            w_blk = weight[v0:v1]
            for r0, r1 in tiles.row_blocks():
                z = tiles.logits(h[r0:r1], w_blk, None)
                out = lse_blk[: r1 - r0]
                _poison(out)
                self.lse_rows(z, 1.0, out)
                torch.logaddexp(lse[r0:r1], out, out=lse[r0:r1])
        return lse

    def sample_pass(self, h, weight, banned, inv_t, lp_scale, seed):
        n, V = h.shape[0], weight.shape[0]
        acc = acc_dtype(h)
        lse = torch.full((n,), _NEG_INF, dtype=acc, device=h.device)
        best = torch.full((n,), _NEG_INF, dtype=acc, device=h.device)
        tokens = torch.zeros(n, dtype=torch.int64, device=h.device)
        if n == 0:
            return tokens, lse
        tiles = _Tiles(n, V, h.dtype, h.device, banned, self)
        R = tiles.tiling.rows
        lse_blk = _empty((R,), acc, h.device)
        key_blk = _empty((R,), acc, h.device)
        tok_blk = _empty((R,), torch.int64, h.device)
        for v0, v1, banned_blk in tiles.vocab_blocks():
            w_blk = weight[v0:v1]
            for r0, r1 in tiles.row_blocks():
                z = tiles.logits(h[r0:r1], w_blk, banned_blk)
                r = r1 - r0
                lse_t, key_t, tok_t = lse_blk[:r], key_blk[:r], tok_blk[:r]
                for buf in (lse_t, key_t, tok_t):
                    _poison(buf)
                self.sample_rows(z, inv_t, lp_scale, seed, r0, v0, tok_t, key_t, lse_t)
                torch.logaddexp(lse[r0:r1], lse_t, out=lse[r0:r1])
                better = key_t > best[r0:r1]  # strict: the earlier block keeps a tie
                best[r0:r1] = torch.where(better, key_t, best[r0:r1])
                tokens[r0:r1] = torch.where(better, tok_t, tokens[r0:r1])
        return tokens, lse

    def grad_pass(self, h, weight, banned, lse, index, coef, scale, need_h, need_w):
        n, H = h.shape
        V = weight.shape[0]
        acc = acc_dtype(h)
        grad_h = torch.zeros(n, H, dtype=acc, device=h.device) if need_h else None
        grad_w = torch.zeros(V, H, dtype=acc, device=h.device) if need_w else None
        if n == 0:
            return grad_h, grad_w
        tiles = _Tiles(n, V, h.dtype, h.device, banned, self)
        for v0, v1, banned_blk in tiles.vocab_blocks():
            w_blk = weight[v0:v1]
            index_blk = index - v0
            for r0, r1 in tiles.row_blocks():
                z = tiles.logits(h[r0:r1], w_blk, banned_blk)
                self.grad_rows_(z, lse[r0:r1], index_blk[r0:r1], coef[r0:r1], scale)
                if need_h:
                    _acc_mm(grad_h[r0:r1], z, w_blk)
                if need_w:
                    _acc_mm(grad_w[v0:v1], z.T, h[r0:r1])
        return grad_h, grad_w


def acc_dtype(h: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of inputs like ``h``: float64 for float64, else float32."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32
