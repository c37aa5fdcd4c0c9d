"""What every benchmark measures with: time, peak extra memory, and the machine it ran on.

Nothing here knows about Quiet-STaR. ``_report.py`` turns the measurements into tables, claims and
result files; ``_models.py`` builds the small Mistral the model-level benchmarks share.

Timing
    :func:`time_calls` times one or several zero-argument callables *interleaved* (round robin),
    after a warmup, and returns a :class:`Timing` (median, quartiles, min) per callable.
    Interleaving spreads the noise of a shared machine over all providers instead of penalising
    whichever ran during a burst. CUDA work is synchronised around every call.

Peak extra memory
    :func:`peak_extra_memory` runs a callable once and returns the highest number of bytes
    allocated *above the level at the start of the call*:

    * CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
      ``memory_allocated()`` at the start.
    * CPU: the PyTorch profiler with ``profile_memory=True``. c10's default CPU allocator reports
      every allocation and free it serves while the profiler runs (``[memory]`` records with a
      signed byte count). We sort the records by time, sum the signed sizes and take the maximum
      of the running sum. That covers every tensor allocated through ATen: ATen ops, autograd
      buffers, Inductor-generated code (it calls ``empty_strided``) and ``at::empty`` inside C++
      extensions. It does *not* see memory a kernel takes with ``malloc``/``new``/``std::vector``
      or a BLAS library's internal workspace. :func:`cpu_memory_selfcheck` verifies the method
      (``benchmarks/validate_memory.py`` also checks an ``at::empty`` made in a C++ extension).

    The callable must drop everything it allocates before returning (return nothing, clear
    ``.grad``): a block allocated while the profiler runs but freed after it stops stays in the
    allocator's size table and would skew a later measurement.

Machine
    :func:`machine_info` / :func:`format_machine` describe the CPU, cores, load, torch build and GPU.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

# The profiler's Kineto backend logs start/stop lines (and a GPU probe error without a GPU) to
# stderr; keep them out of the benchmark output unless the user asked for them.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

#: The checkout root. Run from a checkout without an install, the benchmarks import the packages
#: (qstar_kernels, qstar) from here: importing this module puts it on sys.path.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("qstar_kernels") is None:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

__all__ = [
    "MB",
    "Timing",
    "time_calls",
    "synchronize",
    "peak_extra_memory",
    "cpu_memory_selfcheck",
    "machine_info",
    "format_machine",
    "load_average",
]

MB = 1024.0 * 1024.0


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def synchronize(device: str | torch.device) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Timing:
    """Wall times of repeated calls, in milliseconds."""

    def __init__(self, samples_ms: Sequence[float]):
        self.samples_ms = list(samples_ms)

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms) if self.samples_ms else math.nan

    @property
    def min(self) -> float:
        return min(self.samples_ms) if self.samples_ms else math.nan

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_ms) if self.samples_ms else math.nan

    def quantile(self, p: float) -> float:
        s = sorted(self.samples_ms)
        if not s:
            return math.nan
        pos = p * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def iqr(self) -> float:
        return self.quantile(0.75) - self.quantile(0.25)

    def as_dict(self, prefix: str = "") -> dict:
        """The row columns of every result file: ``<prefix>median_ms``, ``p25_ms``, ``p75_ms``,
        ``min_ms``, ``mean_ms`` and ``n``."""
        return {
            f"{prefix}median_ms": self.median,
            f"{prefix}p25_ms": self.quantile(0.25),
            f"{prefix}p75_ms": self.quantile(0.75),
            f"{prefix}min_ms": self.min,
            f"{prefix}mean_ms": self.mean,
            f"{prefix}n": self.n,
        }

    def __repr__(self) -> str:
        return f"Timing(median={self.median:.3f} ms, iqr={self.iqr:.3f}, min={self.min:.3f}, n={self.n})"


def time_calls(
    fns: dict[str, Callable[[], object]],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 1,
    repeats: int = 10,
    min_repeats: int = 3,
    max_seconds: float | None = None,
    on_error: Callable[[str, BaseException], None] | None = None,
) -> dict[str, Timing]:
    """Time each callable ``repeats`` times, interleaved round robin, after ``warmup`` calls each.

    ``max_seconds`` caps the time spent per callable: the number of repeats is cut (never below
    ``min_repeats``) from the duration of the last warmup call. Callables that raise are dropped
    and reported through ``on_error`` (or re-raised when it is None).
    """
    live = dict(fns)
    samples: dict[str, list[float]] = {name: [] for name in live}
    target = dict.fromkeys(live, repeats)

    def call(name: str) -> float | None:
        try:
            synchronize(device)
            t0 = time.perf_counter()
            live[name]()
            synchronize(device)
            return (time.perf_counter() - t0) * 1e3
        except Exception as exc:  # noqa: BLE001 - a failing provider must not stop the others
            live.pop(name)
            samples.pop(name)
            if on_error is None:
                raise
            on_error(name, exc)
            return None

    for name in list(live):
        ms = None
        for _ in range(warmup):
            if (ms := call(name)) is None:
                break
        if name in live and max_seconds is not None and ms:
            target[name] = min(repeats, max(min_repeats, int(max_seconds * 1e3 / ms)))
    for r in range(max(target.values(), default=0)):
        for name in list(live):
            if r < target[name] and (ms := call(name)) is not None:
                samples[name].append(ms)
    return {name: Timing(s) for name, s in samples.items()}


# --------------------------------------------------------------------------------------------
# Peak extra memory
# --------------------------------------------------------------------------------------------


def _memory_records_kineto(prof) -> list[tuple[int, int]] | None:
    """(time_ns, signed bytes) of the CPU ``[memory]`` records, from the in-memory Kineto results."""
    try:
        events = prof.profiler.kineto_results.events()
        out = []
        for e in events:
            if e.name() != "[memory]":
                continue
            if e.device_type() != torch.autograd.DeviceType.CPU:
                continue
            out.append((int(e.start_ns()), int(e.nbytes())))
        return out
    except Exception:  # noqa: BLE001 - private API; fall back to the chrome trace
        return None


def _memory_records_chrome(prof) -> list[tuple[float, int]]:
    """The same records read back from an exported chrome trace (public API, slower)."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="bench_trace_")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    out = []
    for ev in trace.get("traceEvents", []):
        if ev.get("name") != "[memory]":
            continue
        args = ev.get("args", {})
        # Device Type 0 is the CPU (c10::DeviceType::CPU).
        if int(args.get("Device Type", 0)) != 0:
            continue
        out.append((float(ev.get("ts", 0.0)), int(args.get("Bytes", 0))))
    return out


def _cpu_peak_from_records(records: list[tuple[float, int]]) -> int:
    records = sorted(records, key=lambda r: r[0])  # stable: ties keep their recorded order
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (Kineto prints profiler start/stop lines from C++)."""
    if os.environ.get("BENCH_PROFILER_LOGS"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_extra_memory(
    fn: Callable[[], object], device: str | torch.device = "cpu", method: str = "auto"
) -> int:
    """Peak bytes allocated above the starting level while ``fn()`` runs (see the module doc).

    ``fn`` must return nothing that it allocated (drop outputs and ``.grad`` inside it).
    ``method``: "auto", "kineto" or "chrome" (CPU only; CUDA always uses the allocator stats).
    """
    dev = torch.device(device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return max(0, torch.cuda.max_memory_allocated(dev) - start)
    if dev.type != "cpu":
        raise NotImplementedError(f"peak memory on {dev.type} is not implemented")
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    records = None
    if method in ("auto", "kineto"):
        records = _memory_records_kineto(prof)
        if records is None and method == "kineto":
            raise RuntimeError("the Kineto event API is not available in this torch build")
    if records is None:
        records = _memory_records_chrome(prof)
    return _cpu_peak_from_records(records)


def cpu_memory_selfcheck(verbose: bool = False) -> tuple[bool, str]:
    """Check the CPU method against allocations of known size. Returns (ok, message).

    Cases: a lone ``torch.empty`` (8 MiB); two live tensors then one freed then a smaller one
    (peak = 12 MiB, not the 14 MiB total); a matmul output (4 MiB); and the Kineto reading against
    the chrome-trace reading of the same case.
    """
    mib = 1 << 20
    a = torch.randn(512, 1024)
    b = torch.randn(1024, 1024)

    def lone():
        x = torch.empty(2 * mib)  # 8 MiB of float32
        del x

    def sequence():
        x = torch.empty(mib)  # 4 MiB
        y = torch.empty(2 * mib)  # 8 MiB -> 12 live
        del x
        z = torch.empty(mib // 2)  # 2 MiB -> 10 live
        del y, z

    def matmul():
        c = a @ b  # (512, 1024) float32 = 2 MiB
        d = torch.cat([c, c])  # 4 MiB -> 6 live
        del c, d

    expected = {"lone": 8 * mib, "sequence": 12 * mib, "matmul": 6 * mib}
    got = {
        "lone": peak_extra_memory(lone),
        "sequence": peak_extra_memory(sequence),
        "matmul": peak_extra_memory(matmul),
    }
    chrome = peak_extra_memory(sequence, method="chrome")
    problems = []
    for name, exp in expected.items():
        # allow a few KiB for small bookkeeping tensors an op may create
        if not (exp <= got[name] <= exp + 64 * 1024):
            problems.append(f"{name}: expected {exp} B, measured {got[name]} B")
    if chrome != got["sequence"]:
        problems.append(f"chrome trace reading {chrome} B != Kineto reading {got['sequence']} B")
    ok = not problems
    msg = "CPU memory measurement self-check " + ("passed" if ok else "FAILED: " + "; ".join(problems))
    if verbose:
        print(msg, {k: v / mib for k, v in got.items()}, file=sys.stderr)
    return ok, msg


# --------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _mem_total_gb() -> float | None:
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1024.0 * 1024.0)
    return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (above the core count: other work shared the machine)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(device: str | torch.device = "cpu") -> dict:
    dev = torch.device(device)
    try:
        transformers = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers = None
    info = {
        "cpu": _cpu_model(),
        "cores": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_gb": _mem_total_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers,
        "device": str(dev),
        "device_kind": dev.type,
        "gpu": None,
        "loadavg_before": load_average(),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        info["gpu"] = props.name
        info["gpu_mem_gb"] = props.total_memory / 1024**3
    return info


def format_machine(info: dict) -> str:
    if "description" in info:  # a modelled machine (attention_model.py)
        return info["description"]
    mem = f", {info['mem_total_gb']:.0f} GB RAM" if info.get("mem_total_gb") else ""
    line = (
        f"{info['cpu']} | {info['cores']} cores ({info['torch_threads']} torch threads){mem} | "
        f"Python {info['python']} | torch {info['torch']}"
    )
    if info.get("torch_cuda"):
        line += f" (CUDA {info['torch_cuda']} build)"
    if info.get("gpu"):
        line += f" | GPU: {info['gpu']} ({info.get('gpu_mem_gb', 0):.0f} GB)"
    else:
        line += " | no GPU used"
    return line
