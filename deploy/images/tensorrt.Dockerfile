# gpt2-deploy on TensorRT: the full TensorRT (builder + runtime) from NVIDIA's container, no torch.
# The engine is built on the GPU the container runs on, at first start (entrypoint.sh `serve`) or
# in an init step (`entrypoint.sh build`, a Kubernetes init container), because an engine is tied
# to the GPU architecture and TensorRT version that built it. Build from the repository root:
#   docker build -f deploy/images/tensorrt.Dockerfile -t gpt2-deploy:tensorrt .   (make image-tensorrt)
#   docker run --rm --gpus all -p 8081:8081 -v "$PWD/bundles/gpt2:/models/bundle" gpt2-deploy:tensorrt
# The bundle directory must be writable (the engine and its timing cache are written into it): mount
# a writable one at /models/bundle, or bake one with --build-arg BUNDLE=DIR: it lands read-only in
# /models/baked and is copied to /models/bundle at start (GPT2_DEPLOY_BUNDLE_SOURCE). A restarted
# container that keeps /models/bundle (a volume, an emptyDir) finds its engine and skips the build.
#
# Base: nvcr.io/nvidia/tensorrt:25.01-py3 = TensorRT 10.8, CUDA 12.8, Ubuntu 24.04, Python 3.12,
# the TensorRT Python bindings installed. The tag fixes the TensorRT version written into every
# engine: a new tag means new engines (the entrypoint notices the mismatch and rebuilds). It runs
# on Turing through Blackwell GPUs with an R570+ driver. cuda-python is pinned to the same CUDA
# major.minor as the base (CUDA_PYTHON).

# --- build: the venv (sees the container's tensorrt through --system-site-packages)
FROM nvcr.io/nvidia/tensorrt:25.01-py3 AS build
ARG CUDA_PYTHON=cuda-python==12.8.*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY export ./export
COPY deploy ./deploy
COPY serving ./serving
# `.` plus cuda-python, not the `tensorrt` extra: the container's TensorRT must be the one used,
# not a second copy from PyPI that would not match the engines built here.
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir . "${CUDA_PYTHON}" \
    && /opt/venv/bin/python -c "import importlib.util as u; assert u.find_spec('tensorrt'), 'no tensorrt bindings in the base image'"

# --- runtime: same base (the builder is needed at start), the venv, the entrypoint, a bundle
FROM nvcr.io/nvidia/tensorrt:25.01-py3 AS runtime
RUN groupadd --system --gid 10001 gpt2 \
    && useradd --system --uid 10001 --gid gpt2 --create-home --home-dir /home/gpt2 --shell /usr/sbin/nologin gpt2 \
    && mkdir -p /models/bundle \
    && chown gpt2:gpt2 /models/bundle
COPY --from=build /opt/venv /opt/venv
COPY deploy/images/entrypoint.sh deploy/images/engine_status.py /opt/gpt2-deploy/
ARG BUNDLE=deploy/images/no-bundle
COPY ${BUNDLE} /models/baked
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GPT2_DEPLOY_BUNDLE=/models/bundle \
    GPT2_DEPLOY_BUNDLE_SOURCE=/models/baked \
    GPT2_DEPLOY_BACKEND=tensorrt \
    GPT2_DEPLOY_DEVICE=cuda \
    GPT2_DEPLOY_PRESET=server \
    GPT2_DEPLOY_ENGINE_BUILD=auto \
    GPT2_DEPLOY_HOST=0.0.0.0 \
    GPT2_DEPLOY_PORT=8081 \
    GPT2_DEPLOY_METRICS_PORT=8082
USER 10001:10001
WORKDIR /home/gpt2
EXPOSE 8081 8082
# The start period covers a first-start engine build (minutes for the larger models).
HEALTHCHECK --interval=15s --timeout=10s --start-period=900s --retries=3 \
    CMD ["/opt/gpt2-deploy/entrypoint.sh", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/gpt2-deploy/entrypoint.sh"]
CMD ["serve"]
