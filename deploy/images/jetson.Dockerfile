# gpt2-deploy on a Jetson Orin (JetPack 6.1/6.2): TensorRT 10.3 from NVIDIA's L4T TensorRT image,
# the orin presets, no torch. The engine is built on the board at first start (or with
# `entrypoint.sh build`); GPT2_DEPLOY_PRESET=auto picks orin-nano / orin-nx / agx-orin from
# /proc/device-tree/model. Build on the Jetson itself, or on another host for linux/arm64:
#   docker build --platform linux/arm64 -f deploy/images/jetson.Dockerfile -t gpt2-deploy:jetson .
#   docker run --rm --runtime nvidia -p 8081:8081 -v "$HOME/bundles/gpt2:/models/bundle" gpt2-deploy:jetson
# Bundle handling as in tensorrt.Dockerfile (writable /models/bundle, or baked into /models/baked).
# Power mode is the host's: `sudo nvpmodel -m 0 && sudo jetson_clocks` before starting (docs/deploy.md).
#
# Base: nvcr.io/nvidia/l4t-tensorrt:r10.3.0-runtime = TensorRT 10.3 for L4T r36 (JetPack 6.1 = L4T
# 36.4.0, 6.2 = 36.4.3; CUDA 12.6), Ubuntu 22.04, Python 3.10. JetPack 6.0 ships TensorRT 8.6 and
# is not supported: TensorRT 10 is what the builder code is written for. The image's TensorRT must
# match the board's JetPack release, so the tag is pinned to it; the -runtime flavour carries the
# libraries and Python bindings but no compilers or headers (-devel). cuda-python follows CUDA 12.6.

# --- build: the venv (sees the image's tensorrt bindings through --system-site-packages)
FROM nvcr.io/nvidia/l4t-tensorrt:r10.3.0-runtime AS build
ARG CUDA_PYTHON=cuda-python==12.6.*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY export ./export
COPY deploy ./deploy
COPY serving ./serving
RUN python3 -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir . "${CUDA_PYTHON}" \
    && /opt/venv/bin/python -c "import importlib.util as u; assert u.find_spec('tensorrt'), 'no tensorrt bindings in the base image'"

# --- runtime
FROM nvcr.io/nvidia/l4t-tensorrt:r10.3.0-runtime AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 gpt2 \
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
    GPT2_DEPLOY_PRESET=auto \
    GPT2_DEPLOY_ENGINE_BUILD=auto \
    GPT2_DEPLOY_HOST=0.0.0.0 \
    GPT2_DEPLOY_PORT=8081 \
    GPT2_DEPLOY_METRICS_PORT=8082
USER 10001:10001
WORKDIR /home/gpt2
EXPOSE 8081 8082
# An Orin Nano builds a 124M engine in minutes: the start period covers it.
HEALTHCHECK --interval=30s --timeout=15s --start-period=1800s --retries=3 \
    CMD ["/opt/gpt2-deploy/entrypoint.sh", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/gpt2-deploy/entrypoint.sh"]
CMD ["serve"]
