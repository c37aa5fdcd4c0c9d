"""The resource report of the built CUDA extension (``qstar_kernels._C_cuda``), without a GPU:
per kernel instance and arch, registers, static shared memory, the dynamic shared memory it is
launched with, their sum, and the stack frame / local memory (a register spill needs a stack
frame, so 0 and 0 means no spill).

    python scripts/cuda_resources.py                    # table on stdout
    python scripts/cuda_resources.py --out benchmarks/results/cuda_resources.txt

The numbers come from ``cuobjdump --dump-resource-usage`` on the module (the CUDA toolkit's, or the
copy Triton ships) and from ``_C_cuda.launch_table()`` (the launch constants). Exits 1 if any
kernel spills, uses local memory or needs more than 100 KB of shared memory per block.
tests/test_cuda_build.py checks the same on every run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

MAX_SMEM = 100 * 1024
#: The mangled form of each dtype template argument of our kernels.
MANGLED_DTYPE = {"float32": "If", "float16": "I6__half", "bfloat16": "I13__nv_bfloat16"}


def find_cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the copy Triton ships (a CUDA torch brings Triton)."""
    candidates = []
    home = os.environ.get("CUDA_HOME")
    if home:
        candidates.append(Path(home, "bin", "cuobjdump"))
    for tool in ("nvcc", "cuobjdump"):
        found = shutil.which(tool)
        if found:
            candidates.append(Path(found).resolve().parent / "cuobjdump")
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.exists()), None)


def parse_resource_usage(text: str) -> list[dict]:
    """Rows (arch, function, reg, stack, shared, local) of ``cuobjdump --dump-resource-usage``."""
    rows, arch, fn = [], None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            fn = m.group(1)
        elif fn is not None and "REG:" in line:
            vals = dict(re.findall(r"(\w+):(\d+)", line))
            rows.append(
                dict(
                    arch=arch,
                    function=fn,
                    reg=int(vals["REG"]),
                    stack=int(vals["STACK"]),
                    shared=int(vals["SHARED"]),
                    local=int(vals["LOCAL"]),
                )
            )
            fn = None
    return rows


def instance_key(entry: dict) -> str:
    """The substring of the mangled name of a launch-table entry's kernel instance."""
    key = entry["kernel"] + MANGLED_DTYPE[entry["dtype"]]
    if entry["head_dim"]:
        key += f"Li{entry['head_dim']}E"
    return key


def report(module_path: str, launch_table: list[dict], cuobjdump: str) -> tuple[list[dict], list[str]]:
    """(rows with the launch data joined, problems)."""
    res = subprocess.run(
        [cuobjdump, "--dump-resource-usage", module_path], capture_output=True, text=True, timeout=300
    )
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    rows = [r for r in parse_resource_usage(res.stdout) if "qstar" in r["function"]]
    problems = []
    for r in rows:
        hits = [e for e in launch_table if instance_key(e) in r["function"]]
        e = max(hits, key=lambda e: e["dynamic_smem"]) if hits else None
        r["kernel"] = e["kernel"] if e else re.sub(r"^.*?\d+([a-z_]+kernel).*$", r"\1", r["function"])
        r["dtype"] = e["dtype"] if e else "-"
        r["head_dim"] = e["head_dim"] if e else 0
        r["threads"] = e["threads"] if e else 0
        r["dynamic"] = e["dynamic_smem"] if e else 0
        r["total_smem"] = r["shared"] + r["dynamic"]
        if r["stack"] or r["local"]:
            problems.append(f"{r['arch']} {r['kernel']} {r['dtype']} D={r['head_dim']}: stack/local memory")
        if r["total_smem"] > MAX_SMEM:
            problems.append(
                f"{r['arch']} {r['kernel']} {r['dtype']} D={r['head_dim']}: {r['total_smem']} B smem"
            )
    return rows, problems


def format_table(rows: list[dict]) -> str:
    head = f"{'arch':<6} {'kernel':<22} {'dtype':<9} {'D':>4} {'threads':>7} {'regs':>5} "
    head += f"{'static B':>9} {'dynamic B':>10} {'total KB':>9} {'stack':>6} {'local':>6}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"], r["dtype"], r["head_dim"])):
        lines.append(
            f"{r['arch']:<6} {r['kernel']:<22} {r['dtype']:<9} {r['head_dim'] or '-':>4} "
            f"{r['threads']:>7} {r['reg']:>5} {r['shared']:>9} {r['dynamic']:>10} "
            f"{r['total_smem'] / 1024:>9.1f} {r['stack']:>6} {r['local']:>6}"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    import torch  # noqa: F401  (libc10 before the extension)

    from qstar_kernels import _ext

    ext = _ext.cuda_extension()
    if ext is None:
        print(f"the CUDA extension is not built: {_ext.cuda_extension_error()}", file=sys.stderr)
        return 2
    if not hasattr(ext, "launch_table"):
        print(f"{ext.__file__} was built from older sources (no launch_table); rebuild it", file=sys.stderr)
        return 2
    tool = find_cuobjdump()
    if tool is None:
        print("no cuobjdump found (CUDA toolkit or Triton's copy)", file=sys.stderr)
        return 2
    rows, problems = report(ext.__file__, ext.launch_table(), tool)
    text = format_table(rows)
    text += "\n\n" + (
        "no spills, no local memory, every block within 100 KB of shared memory"
        if not problems
        else "PROBLEMS:\n" + "\n".join(problems)
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
