#!/usr/bin/env bash
# Everything that needs a GPU, in one command (`make gpu-check`), with the results kept under the
# device's name in benchmarks/results/gpu_check_<device>/ (commit that folder):
#   1. every GPU test (pytest -m gpu: Triton, CUDA, mixing/sampling, mask builder), with a JUnit XML;
#   2. the attention benchmark on the GPU (full grid, claims checked) and the LM-head benchmark;
#   3. whether the CUDA backend is within 1.2x of Triton on each configuration;
#   4. one Quiet-STaR training step, ours vs the authors' way (benchmarks/train_step.py);
#   5. a Mistral-7B-shaped model at the paper's settings, bf16, checkpointing, with and without LoRA:
#      measured peak memory and step time next to benchmarks/memory_model.py's prediction.
# Every step runs even if an earlier one fails; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python}"
name=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -z "$name" ]; then
  echo "gpu-check: no CUDA GPU is visible here; run it on a GPU machine" >&2
  exit 2
fi
out="benchmarks/results/gpu_check_$(echo "$name" | tr -c 'A-Za-z0-9_.-\n' '_')"
mkdir -p "$out"
"$PY" -c "import torch, qstar_kernels as qk; print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'backends', qk.available_backends('cuda'))" | tee "$out/device.txt"

status=0
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember a failure
  local log="$out/$1.log"; shift
  echo "== $*" | tee "$log"
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== exit status $rc" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}
step pytest_gpu "$PY" -m pytest -m gpu -rs --junitxml="$out/pytest_gpu.xml"
step mask_attention "$PY" benchmarks/mask_attention.py --device cuda --full --check --out-dir "$out" --tag cuda_full
step mixing_ce "$PY" benchmarks/mixing_ce.py --device cuda --full --out-dir "$out" --tag cuda_full
step cuda_vs_triton "$PY" benchmarks/cuda_vs_triton.py "$out"/*.csv
step train_step "$PY" benchmarks/train_step.py --device cuda --check --out-dir "$out" --tag cuda
step mistral7b "$PY" benchmarks/mistral7b_gpu.py --out-dir "$out"
echo "gpu-check: results in $out (exit status $status)"
exit "$status"
