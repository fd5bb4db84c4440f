# gpt2-deploy. `make setup` then `make test`; `make demo` runs the main job on the tiny preset.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/gpt2-deploy
# Pinned so pip takes the CPU build on disk instead of resolving a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# onnxruntime scheme: cpu -> onnxruntime, gpu -> onnxruntime-gpu (see pyproject.toml).
ORT ?= cpu
EXTRAS ?= export,$(ORT),dev

MODEL ?= tiny
OUT ?= bundles/$(MODEL)
PRECISION ?= fp32
SEED ?= 0
BUNDLE ?= $(OUT)
BACKEND ?= onnxruntime
HOST ?= 127.0.0.1
PORT ?= 50051
PRESET ?= server
ENGINE_PRECISION ?= fp16

.PHONY: help setup test test-gpu lint export engine serve demo proto proto-check bench gpu-check clean

help:
	@echo "make setup      create $(VENV) with torch first, then gpt2-deploy[$(EXTRAS)]"
	@echo "make test       CPU test suite (TensorRT/GPU tests skip with their reason)"
	@echo "make export     MODEL=tiny|gpt2-124m|...|gpt2|DIR OUT=DIR PRECISION=fp32|fp16|int8|ort-fused"
	@echo "make engine     BUNDLE=DIR PRESET=server|orin-nano|orin-nx|agx-orin (needs TensorRT)"
	@echo "make serve      BUNDLE=DIR BACKEND=onnxruntime|torch|tensorrt PORT=50051"
	@echo "make demo       export tiny, serve it, stream a generation, print parity, stop"
	@echo "make bench      CPU decode benchmarks: prints a table, writes bench-results/*.json"
	@echo "make test-gpu   the trt/gpu-marked tests (on a machine with a GPU/TensorRT)"
	@echo "make gpu-check  one-shot GPU summary script (sized for a 10-minute GPU session)"
	@echo "make proto      regenerate the gRPC code under serving/proto (committed)"

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

setup: $(VENV)/bin/activate
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	@$(PY) -c "import torch, transformers, onnxruntime; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| onnxruntime', onnxruntime.__version__)"

test:
	$(PY) -m pytest -q

test-gpu:
	$(PY) -m pytest -q -m "trt or gpu" -rs

lint:
	$(VENV)/bin/ruff check .

export:
	$(CLI) export --model "$(MODEL)" --out "$(OUT)" --precision "$(PRECISION)" --seed "$(SEED)"

engine:
	$(CLI) build "$(BUNDLE)" --preset "$(PRESET)" --precision "$(ENGINE_PRECISION)"

serve:
	$(CLI) serve "$(BUNDLE)" --backend "$(BACKEND)" --host "$(HOST)" --port "$(PORT)"

demo:
	$(PY) -m serving.demo

proto:
	$(PY) -m serving.proto.generate

proto-check:
	$(PY) -m serving.proto.generate --check

bench:
	$(PY) -m serving.bench --out bench-results

gpu-check:
	$(PY) -m serving.gpu_check

clean:
	rm -rf bundles bench-results .pytest_cache
