# gpt2-deploy on an NVIDIA GPU with ONNX Runtime's CUDA execution provider (onnxruntime-gpu), no
# torch, no TensorRT. Build from the repository root (make image-cuda):
#   docker build -f deploy/images/cuda.Dockerfile -t gpt2-deploy:cuda .
#   docker run --rm --gpus all -p 8081:8081 -p 8082:8082 -v "$PWD/bundles/gpt2:/models/bundle:ro" gpt2-deploy:cuda
# Bundle, ports, user and configuration as in cpu.Dockerfile (GPT2_DEPLOY_*, see entrypoint.sh).
#
# Base: nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04. onnxruntime-gpu on PyPI is built for CUDA 13
# and cuDNN 9 since its CUDA 12 builds were retired (1.27/1.28), so the base carries the CUDA 13
# runtime libraries and cuDNN 9 and nothing to compile with (the -runtime flavour, not -devel).
# The tag pins CUDA to the patch release; the host driver must support CUDA 13 (R580 or newer).
# ORT_GPU pins onnxruntime-gpu to a release built for that CUDA major: move both together.
# Ubuntu 24.04's Python is 3.12; both stages use the same tag so the copied venv finds it.

# --- build: the venv with onnxruntime-gpu; python3-venv and pip stay in this stage
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS build
ARG ORT_GPU=onnxruntime-gpu==1.31.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY export ./export
COPY deploy ./deploy
COPY serving ./serving
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir '.[gpu]' "${ORT_GPU}" \
    && /opt/venv/bin/python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers(), o.get_available_providers()"

# --- runtime: the interpreter (no pip, no venv module), the venv, the entrypoint, a bundle
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 gpt2 \
    && useradd --system --uid 10001 --gid gpt2 --create-home --home-dir /home/gpt2 --shell /usr/sbin/nologin gpt2
COPY --from=build /opt/venv /opt/venv
COPY deploy/images/entrypoint.sh deploy/images/engine_status.py /opt/gpt2-deploy/
ARG BUNDLE=deploy/images/no-bundle
COPY ${BUNDLE} /models/bundle
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GPT2_DEPLOY_BUNDLE=/models/bundle \
    GPT2_DEPLOY_BACKEND=onnxruntime \
    GPT2_DEPLOY_DEVICE=cuda \
    GPT2_DEPLOY_HOST=0.0.0.0 \
    GPT2_DEPLOY_PORT=8081 \
    GPT2_DEPLOY_METRICS_PORT=8082
USER 10001:10001
WORKDIR /home/gpt2
EXPOSE 8081 8082
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=3 \
    CMD ["/opt/gpt2-deploy/entrypoint.sh", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/gpt2-deploy/entrypoint.sh"]
CMD ["serve"]
