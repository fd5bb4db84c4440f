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
# Container images (deploy/images/VARIANT.Dockerfile): `make image VARIANT=cpu|cuda|tensorrt|jetson`
# or `make image-cpu` ...; IMAGE_BUNDLE=bundles/gpt2 bakes that bundle in (default: mounted at run).
DOCKER ?= docker
IMAGE ?= gpt2-deploy
VARIANT ?= cpu
IMAGE_BUNDLE ?=
# The KServe SDK's models, for tests/deploy/test_manifests.py: kserve pins protobuf < 7, so its wheel
# goes beside the venv without its dependencies (only kserve.models is imported, needing six + urllib3).
KSERVE_SDK_SPEC ?= kserve==0.21.0

.PHONY: help setup test test-gpu lint lint-images export engine serve demo proto proto-check bench bench-quick bench-setup gpu-check clean
.PHONY: image image-cpu image-cuda image-tensorrt image-jetson
.PHONY: fuzz soak

help:
	@echo "make setup      create $(VENV) with torch first, then gpt2-deploy[$(EXTRAS)]"
	@echo "make test       CPU test suite (TensorRT/GPU tests skip with their reason)"
	@echo "make export     MODEL=tiny|gpt2-124m|...|gpt2|DIR OUT=DIR PRECISION=fp32|fp16|int8|int4|ort-fused"
	@echo "make engine     BUNDLE=DIR PRESET=server|orin-nano|orin-nx|agx-orin (needs TensorRT)"
	@echo "make serve      BUNDLE=DIR BACKEND=onnxruntime|torch|tensorrt PORT=50051"
	@echo "make demo       export tiny, serve it, stream a generation, print parity, stop"
	@echo "make bench      CPU benchmark vs transformers generate + peers, gRPC streams (~20 min): table, JSON, PNG"
	@echo "make bench-quick  the same on the tiny preset in < 2 min (a smoke run, not numbers to quote)"
	@echo "make bench-setup  install the bench extra (matplotlib, CTranslate2, llama-cpp-python: builds llama.cpp)"
	@echo "make test-gpu   the trt/gpu-marked tests (on a machine with a GPU/TensorRT)"
	@echo "make gpu-check  the GPU path measured in one run sized for a 10-minute GPU session (docs/gpu.md);"
	@echo "                GPU_CHECK_ARGS='--budget 300 --bundle DIR ...', PY=python3 on a machine without the venv"
	@echo "make fuzz       property-based request fuzzing, FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) per test (make test runs a short, fixed-seed pass)"
	@echo "make soak       STREAMS=$(STREAMS) MINUTES=$(MINUTES) [SOAK_BUNDLE=DIR]: mixed traffic + bad requests vs a serve process; errors, RSS, tokens/s"
	@echo "make proto      regenerate the gRPC code under serving/proto (committed)"
	@echo "make lint       ruff check, ruff format --check, mypy (+ lint-images); CI runs it before the tests"
	@echo "make image      VARIANT=cpu|cuda|tensorrt|jetson [IMAGE_BUNDLE=DIR]: docker build (image-cpu, ...)"
	@echo "make lint-images  hadolint the Dockerfiles, shellcheck the entrypoint (make test runs them too)"

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

setup: $(VENV)/bin/activate
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/kserve-sdk "$(KSERVE_SDK_SPEC)" "six>=1.16" "urllib3>=2"
	@$(PY) -c "import torch, transformers, onnxruntime; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| onnxruntime', onnxruntime.__version__)"

test:
	$(PY) -m pytest -q

test-gpu:
	$(PY) -m pytest -q -m "trt or gpu" -rs

# ruff over the tree (the generated gRPC code excluded, pyproject.toml); mypy over export/ deploy/
# serving/ ([tool.mypy]); the same checks run from .pre-commit-config.yaml.
lint: lint-images
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check export deploy serving tests
	$(VENV)/bin/mypy

lint-images:
	$(VENV)/bin/hadolint --config .hadolint.yaml deploy/images/*.Dockerfile
	$(VENV)/bin/shellcheck deploy/images/entrypoint.sh

# Build from the repository root; BuildKit reads deploy/images/VARIANT.Dockerfile.dockerignore.
image: image-$(VARIANT)

image-cpu image-cuda image-tensorrt:
	DOCKER_BUILDKIT=1 $(DOCKER) build -f deploy/images/$(@:image-%=%).Dockerfile \
		$(if $(IMAGE_BUNDLE),--build-arg BUNDLE=$(IMAGE_BUNDLE)) -t $(IMAGE):$(@:image-%=%) .

# Jetson is arm64: build on the board, or elsewhere with QEMU binfmt / a remote arm64 builder.
image-jetson:
	DOCKER_BUILDKIT=1 $(DOCKER) build --platform linux/arm64 -f deploy/images/jetson.Dockerfile \
		$(if $(IMAGE_BUNDLE),--build-arg BUNDLE=$(IMAGE_BUNDLE)) -t $(IMAGE):jetson .

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

bench-quick:
	$(PY) -m serving.bench --quick --out bench-results

bench-setup:
	$(PY) -m pip install -e ".[bench]"

gpu-check:
	$(PY) -m serving.gpu_check $(GPU_CHECK_ARGS)

# tests/serving/test_fuzz.py with the `fuzz` hypothesis profile (random, many examples; failures kept in
# .pytest_cache/hypothesis and replayed first); `make test` runs the derandomized `ci` profile.
FUZZ_EXAMPLES ?= 2000
fuzz:
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/serving/test_fuzz.py \
		--timeout 0

# serving/soak.py: exit 1 when the goal is missed (docs/reliability.md); results in bench-results/soak.
STREAMS ?= 16
MINUTES ?= 10
SOAK_BUNDLE ?=
soak:
	$(PY) -m serving.soak --streams $(STREAMS) --minutes $(MINUTES) --out bench-results/soak \
		$(if $(SOAK_BUNDLE),--bundle $(SOAK_BUNDLE))

clean:
	rm -rf bundles bench-results .pytest_cache
