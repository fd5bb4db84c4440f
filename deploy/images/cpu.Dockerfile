# gpt2-deploy on the CPU: ONNX Runtime only (no torch, no CUDA), non-root, gRPC on 8081 and
# Prometheus metrics on 8082. Build from the repository root (make image-cpu):
#   docker build -f deploy/images/cpu.Dockerfile -t gpt2-deploy:cpu .
#   docker build -f deploy/images/cpu.Dockerfile --build-arg BUNDLE=bundles/tiny -t gpt2-deploy:cpu-tiny .
#   docker run --rm -p 8081:8081 -p 8082:8082 -v "$PWD/bundles/tiny:/models/bundle:ro" gpt2-deploy:cpu
# The bundle is mounted at /models/bundle (GPT2_DEPLOY_BUNDLE) or baked there with --build-arg
# BUNDLE=DIR (a directory inside the build context). Configuration: GPT2_DEPLOY_* variables, see
# entrypoint.sh. docs/deploy.md walks from a bundle to N replicas.
#
# Base: python:3.11.13-slim-bookworm, pinned to the patch release so a rebuild gets the same
# interpreter, and to Python 3.11, the version the test suite runs on. Debian 12 (glibc 2.36)
# satisfies the manylinux_2_28 wheels of onnxruntime, grpcio and tokenizers. Both stages use the
# same tag: the virtual environment copied across points at that interpreter. Bump it on purpose
# (and pin @sha256 in a production registry).

# --- build: resolve and install the wheels into /opt/venv; pip, the sources and caches stay here
FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY export ./export
COPY deploy ./deploy
COPY serving ./serving
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir '.[cpu]' \
    && /opt/venv/bin/python -c "import onnxruntime, serving.server; import importlib.util as u; assert u.find_spec('torch') is None"

# --- runtime: the interpreter, the venv, the entrypoint and (optionally) a bundle
FROM python:3.11.13-slim-bookworm AS runtime
RUN groupadd --system --gid 10001 gpt2 \
    && useradd --system --uid 10001 --gid gpt2 --create-home --home-dir /home/gpt2 --shell /usr/sbin/nologin gpt2
COPY --from=build /opt/venv /opt/venv
COPY deploy/images/entrypoint.sh deploy/images/engine_status.py /opt/gpt2-deploy/
# A bundle baked in (read-only for the server's user); the default is a placeholder that says so.
ARG BUNDLE=deploy/images/no-bundle
COPY ${BUNDLE} /models/bundle
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GPT2_DEPLOY_BUNDLE=/models/bundle \
    GPT2_DEPLOY_BACKEND=onnxruntime \
    GPT2_DEPLOY_DEVICE=cpu \
    GPT2_DEPLOY_HOST=0.0.0.0 \
    GPT2_DEPLOY_PORT=8081 \
    GPT2_DEPLOY_METRICS_PORT=8082
USER 10001:10001
WORKDIR /home/gpt2
EXPOSE 8081 8082
# Docker's own check (Kubernetes uses its native gRPC probes instead): the gRPC health service,
# SERVING only after the bundle loaded and the parity canary passed.
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=3 \
    CMD ["/opt/gpt2-deploy/entrypoint.sh", "health"]
# `serve` is exec'ed: the server is PID 1 and handles SIGTERM itself (drain, then exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/gpt2-deploy/entrypoint.sh"]
CMD ["serve"]
