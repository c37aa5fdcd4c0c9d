"""The CUDA extension (csrc/cuda) without a GPU: it is built for sm_80 and sm_90, every kernel we
wrote is in it for both archs, none spills or uses local memory, each fits in 100 KB of shared
memory per block, the operators are registered with fake implementations that torch.compile can
trace, and the C++ input checks give clear messages.

How the resources are checked:

* ``cuobjdump --dump-resource-usage`` on the built ``_C_cuda`` module lists, per arch and kernel,
  REG, STACK, SHARED (static) and LOCAL. Register spills live in the stack frame, so STACK == 0
  and LOCAL == 0 means no spill and no local memory at all.
* The dynamic shared memory a kernel is launched with is a constexpr of its tile config; the
  module reports it (``launch_table()``, the same constants the launchers pass) and the test adds
  it to the static SHARED of every instance of that kernel.
* ``nvcc -Xptxas -v`` on each ``.cu`` file (they hold no torch header, so this takes seconds)
  gives ptxas's own report with the spill counts, checked line by line.

Everything here skips, with the reason, only when the CUDA extension is not expected (a CPU build
of torch, no nvcc, or QSTAR_SKIP_CUDA_BUILD=1); when it is expected but missing, the tests fail.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from qstar_kernels import _ext

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90")  # what CI builds (setup.py's default always includes them)


def _built_archs() -> set[str]:
    """The archs the build was asked for: QSTAR_CUDA_ARCHS when set, else sm_80 and sm_90."""
    env = os.environ.get("QSTAR_CUDA_ARCHS")
    if not env:
        return set(ARCHS)
    return {"sm_" + a.strip().replace(".", "").split("+")[0] for a in env.split(";") if a.strip()}


def _cuda_build_expected() -> str | None:
    """None if the CUDA extension should be built here, else why not."""
    if torch.version.cuda is None:
        return "torch is a CPU build, so the CUDA extension is not built"
    if os.environ.get("QSTAR_SKIP_CUDA_BUILD") == "1":
        return "QSTAR_SKIP_CUDA_BUILD=1, so the CUDA extension is not built"
    if _nvcc() is None:
        return "no nvcc here, so the CUDA extension is not built"
    return None


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


@pytest.fixture(scope="module")
def ext():
    why = _cuda_build_expected()
    if why is not None:
        pytest.skip(why)
    mod = _ext.cuda_extension()
    assert mod is not None, (
        f"qstar_kernels._C_cuda should be built here but does not import: {_ext.cuda_extension_error()}"
    )
    return mod


def _load_resources_script():
    """scripts/cuda_resources.py (the same parser and launch join that the script prints)."""
    spec = importlib.util.spec_from_file_location("cuda_resources", ROOT / "scripts" / "cuda_resources.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CR = _load_resources_script()
parse_resource_usage = CR.parse_resource_usage


@pytest.fixture(scope="module")
def resources(ext):
    tool = CR.find_cuobjdump()
    assert tool is not None, (
        "no cuobjdump found (CUDA toolkit or Triton's copy) to read the kernels' resources"
    )
    res = subprocess.run(
        [tool, "--dump-resource-usage", ext.__file__], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = parse_resource_usage(res.stdout)
    assert rows, "cuobjdump listed no kernel at all: " + res.stdout[:2000]
    return rows


def test_parse_resource_usage_reads_each_kernel():
    text = """
Fatbin elf code:
================
arch = sm_80
 Function _ZN5qstar4cuda15attn_fwd_kernelI6__halfLi64EEEvv:
  REG:96 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:432 TEXTURE:0 SURFACE:0 SAMPLER:0
arch = sm_90
 Function _ZN5qstar4cuda15attn_fwd_kernelI6__halfLi64EEEvv:
  REG:90 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:432 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    rows = parse_resource_usage(text)
    assert [(r["arch"], r["reg"], r["stack"], r["shared"], r["local"]) for r in rows] == [
        ("sm_80", 96, 0, 0, 0),
        ("sm_90", 90, 16, 1024, 8),
    ]


def test_extension_registers_the_ops(ext):
    from qstar_kernels.backends.attention import cuda as attention_cuda
    from qstar_kernels.backends.lm_head import cuda as lm_head_cuda

    assert attention_cuda.ops_registered() and lm_head_cuda.ops_registered()
    for name in (
        "thought_attention_fwd",
        "thought_attention_bwd",
        "lm_head_mix",
        "lm_head_lse_merge_",
        "lm_head_target_logits",
        "lm_head_grad_rows_",
        "lm_head_mix_backward",
    ):
        assert hasattr(torch.ops.qstar_cuda, name), name


def test_every_kernel_is_built_for_sm80_and_sm90(ext, resources):
    table = ext.launch_table()
    assert {r["kernel"] for r in table} >= {
        "attn_fwd_kernel",
        "attn_bwd_delta_kernel",
        "attn_bwd_dq_kernel",
        "attn_bwd_dkdv_kernel",
        "attn_bwd_diag_kernel",
        "mix_kernel",
        "lse_merge_kernel",
        "target_kernel",
        "grad_rows_kernel",
        "mix_bwd_kernel",
    }
    assert {r["arch"] for r in resources} >= _built_archs()
    for arch in sorted(_built_archs()):
        names = [r["function"] for r in resources if r["arch"] == arch]
        for entry in table:
            key = CR.instance_key(entry)  # the instance for this dtype (and head dim)
            hits = [n for n in names if key in n]
            assert hits, f"{arch}: no kernel {key!r} in the built module"


def test_resource_script_agrees(ext):
    tool = CR.find_cuobjdump()
    rows, problems = CR.report(ext.__file__, ext.launch_table(), tool)
    assert rows and not problems, problems
    assert max(r["total_smem"] for r in rows) <= CR.MAX_SMEM


def test_no_spills_no_local_memory_and_at_most_100kb_shared(ext, resources):
    dynamic: dict[str, int] = {}
    for entry in ext.launch_table():
        key = CR.instance_key(entry)
        dynamic[key] = max(dynamic.get(key, 0), entry["dynamic_smem"])
    ours = [r for r in resources if "qstar" in r["function"]]
    assert len(ours) >= 2 * len(dynamic), "fewer kernels than launch configurations"
    for r in ours:
        assert r["stack"] == 0 and r["local"] == 0, f"spill or local memory: {r}"
        dyn = max((v for k, v in dynamic.items() if k in r["function"]), default=0)
        assert r["shared"] + dyn <= CR.MAX_SMEM, f"{r['shared']} static + {dyn} dynamic bytes > 100 KB: {r}"


def test_ptxas_reports_no_spills(ext, tmp_path):
    """ptxas's own report (-Xptxas -v) of each .cu file, compiled as the build compiles it."""
    nvcc = _nvcc()
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        cmd = [nvcc, "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o"))]
        cmd += ["-I", str(ROOT / "csrc"), "-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        cmd += ["-Xptxas=-v", "-Werror=all-warnings", "-Xcompiler=-fPIC,-Wall,-Wextra,-Werror"]
        for arch in ("80", "90"):
            cmd += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        report = res.stdout + res.stderr
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        assert spills, f"{cu.name}: no ptxas resource report"
        compiled = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", report)
        assert {a for _, a in compiled} == set(ARCHS), f"{cu.name}: archs {compiled}"
        assert all(s == ("0", "0") for s in spills), f"{cu.name}: spills {spills}"
        stacks = re.findall(r"(\d+) bytes stack frame", report)
        assert all(s == "0" for s in stacks), f"{cu.name}: stack frames {stacks}"


# ------------------------------------------------------------------------------------------------
# Fakes (what torch.compile traces) and the C++ input checks, on the CPU
# ------------------------------------------------------------------------------------------------


def test_fake_implementations_give_shapes_and_dtypes(ext):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qstar_kernels.backends.attention import cuda as attention_cuda
    from qstar_kernels.backends.lm_head import cuda as lm_head_cuda

    assert attention_cuda.ops_registered() and lm_head_cuda.ops_registered()
    ops = torch.ops.qstar_cuda
    with FakeTensorMode():
        q = torch.empty(2, 4, 10, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(2, 2, 30, 64, dtype=torch.bfloat16, device="cuda")
        out, lse = ops.thought_attention_fwd(q, k, k, None, 0.125, -1)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        assert lse.shape == (2, 4, 10) and lse.dtype == torch.float32
        dq, dk, dv = ops.thought_attention_bwd(out, lse, q, k, k, out, lse, None, 0.125, -1)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
        # The public op with backend="cuda" goes through qstar::thought_attention_fwd's fake.
        out2, lse2 = torch.ops.qstar.thought_attention_fwd(q, k, k, None, 0.125, -1, "cuda")
        assert out2.shape == q.shape and lse2.dtype == torch.float32

        hb = torch.empty(7, 64, dtype=torch.float16, device="cuda")
        w = torch.empty(7, device="cuda")
        weight = torch.empty(100, 64, dtype=torch.float16, device="cuda")
        h = ops.lm_head_mix(hb, hb, w, torch.float32)
        assert h.shape == hb.shape and h.dtype == torch.float32
        zt = ops.lm_head_target_logits(hb, weight, torch.empty(7, dtype=torch.int64, device="cuda"))
        assert zt.shape == (7,) and zt.dtype == torch.float32
        g_hb, g_ht, g_w = ops.lm_head_mix_backward(h, hb, hb, w)
        assert g_hb.shape == hb.shape and g_w.shape == (7,)


def test_opcheck_on_meta_tensors(ext):
    """torch.library.opcheck (schema, fake, autograd registration) where it can run without a GPU:
    meta tensors, which dispatch to the fake implementations."""
    from qstar_kernels.backends.attention import cuda as attention_cuda
    from qstar_kernels.backends.lm_head import cuda as lm_head_cuda

    assert attention_cuda.ops_registered() and lm_head_cuda.ops_registered()
    ops = torch.ops.qstar_cuda
    q = torch.empty(2, 4, 10, 64, dtype=torch.float16, device="meta")
    k = torch.empty(2, 2, 30, 64, dtype=torch.float16, device="meta")
    keep = torch.empty(2, 10, dtype=torch.bool, device="meta")
    lse = torch.empty(2, 4, 10, device="meta")
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.thought_attention_fwd.default, (q, k, k, keep, 0.125, 4), test_utils=tests)
    torch.library.opcheck(
        ops.thought_attention_bwd.default, (q, lse, q, k, k, q, lse, None, 0.125, -1), test_utils=tests
    )
    hb = torch.empty(7, 64, dtype=torch.bfloat16, device="meta")
    w = torch.empty(7, device="meta")
    torch.library.opcheck(ops.lm_head_mix.default, (hb, hb, w, torch.float32), test_utils=tests)
    z = torch.empty(7, 16, dtype=torch.bfloat16, device="meta")
    idx = torch.empty(7, dtype=torch.int64, device="meta")
    torch.library.opcheck(ops.lm_head_grad_rows_.default, (z, w, idx, w, 1.0), test_utils=tests)


def _qkv(D=64, dtype=torch.float16, Hq=4, Hkv=2, L=8, a=2):
    q = torch.randn(2, Hq, L, D).to(dtype)
    k = torch.randn(2, Hkv, (a + 1) * L, D).to(dtype)
    return q, k, k.clone()


def test_cpp_input_checks_name_the_argument_and_what_was_expected(ext):
    """The TORCH_CHECKs of qstar_cuda::thought_attention_fwd (run on CPU tensors through a
    validation-only entry point: the kernels themselves need a GPU)."""
    check = ext.check_attention_inputs
    q, k, v = _qkv()
    assert check(q, k, v, None, 0.125, 4) == [2, 4, 2, 8, 64, 2, 4]
    assert check(q, k, v, None, 0.125, 100)[-1] == 0  # a window >= L has no effect
    with pytest.raises(RuntimeError, match=r"head dims 64 and 128, got D = 80"):
        check(*_qkv(D=80), None, 0.125, -1)
    with pytest.raises(RuntimeError, match=r"q must be float32, float16 or bfloat16, got Double"):
        check(*_qkv(dtype=torch.float64), None, 0.125, -1)
    with pytest.raises(RuntimeError, match=r"k must have dtype Half, got Float"):
        check(q, k.float(), v, None, 0.125, -1)
    with pytest.raises(RuntimeError, match=r"v must be contiguous"):
        check(q, k, v.transpose(2, 3).contiguous().transpose(2, 3), None, 0.125, -1)
    with pytest.raises(RuntimeError, match=r"Hq = 4 must be a positive multiple of Hkv = 3"):
        check(*_qkv(Hkv=3), None, 0.125, -1)
    with pytest.raises(RuntimeError, match=r"key length must be \(a\+1\)\*L .* L = 8, got 20"):
        check(q, k[:, :, :20].contiguous(), v[:, :, :20].contiguous(), None, 0.125, -1)
    with pytest.raises(RuntimeError, match=r"keep must have shape \(B, L\) = \(2, 8\), got \[2, 7\]"):
        check(q, k, v, torch.ones(2, 7, dtype=torch.bool), 0.125, -1)
    with pytest.raises(RuntimeError, match=r"keep must have dtype Bool, got Long"):
        check(q, k, v, torch.ones(2, 8, dtype=torch.long), 0.125, -1)
    with pytest.raises(RuntimeError, match=r"scale must be finite, got inf"):
        check(q, k, v, None, float("inf"), -1)


def test_cuda_ops_refuse_cpu_tensors(ext):
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=r"qstar_cuda::thought_attention_fwd.*CPU"):
        torch.ops.qstar_cuda.thought_attention_fwd(q, k, v, None, 0.125, -1)


def test_cuda_backend_is_explicit_only_and_says_why_it_cannot_run(ext, monkeypatch):
    import qstar_kernels
    from qstar_kernels import BackendUnavailableError, thought_attention

    assert "cuda" in qstar_kernels.BACKENDS
    assert "cuda" not in qstar_kernels.available_backends("cpu")
    q, k, v = _qkv(dtype=torch.float32)
    with pytest.raises(
        BackendUnavailableError, match=r"backend='cuda' cannot run: .*CUDA tensors, got tensors on cpu"
    ):
        thought_attention(q, k, v, backend="cuda")
    monkeypatch.setenv("QSTAR_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match=r"QSTAR_BACKEND='cuda' cannot run"):
        thought_attention(q, k, v)


def test_cuda_backend_reason_when_not_built(monkeypatch):
    from qstar_kernels import _ext, dispatch

    monkeypatch.setattr(_ext, "cuda_extension", lambda: None)
    monkeypatch.setattr(_ext, "cuda_extension_error", lambda: "ImportError: gone")
    for op in dispatch.OPS:
        why = dispatch.unavailable_reason(op, "cuda", "cuda", torch.float16, 64)
        if op == "sample_thought_tokens":
            assert "implements mixed_token_logprobs only" in why
        else:
            assert "qstar_kernels._C_cuda is not built" in why and "ImportError: gone" in why
