# syntax=docker/dockerfile:1
# cicada-async: the V2 inference server as one container for Knative and KServe.
#
#   docker build -t cicada-async:cpu .                                  # CPU, torch 2.13.0 CPU wheel
#   docker build -t cicada-async:cuda --build-arg VARIANT=cuda .        # CUDA, torch of the base image
#
# The container serves HTTP/1.1 on 0.0.0.0:$PORT (Knative sets PORT; 8080 otherwise), reads its
# config from /etc/cicada/cicada.toml (mount a ConfigMap there, or pass other args), takes S3
# credentials from the standard AWS environment variables, and exits 0 after draining on SIGTERM.
# No HEALTHCHECK: Knative and KServe probe /v2/health/live and /v2/health/ready themselves.

ARG VARIANT=cpu
ARG CPU_BASE=python:3.11-slim-bookworm
# A runtime image (no compilers) that already holds a CUDA build of torch.
ARG CUDA_BASE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

FROM ${CPU_BASE} AS base-cpu
ARG TORCH_VERSION=2.13.0
# The CPU wheel from PyTorch's own index: the PyPI wheel would pull ~2.5 GB of CUDA libraries.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

FROM ${CUDA_BASE} AS base-cuda
# torch comes with the base image and is not pinned here: the project accepts torch>=2.4.

FROM base-${VARIANT} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    PORT=8080
WORKDIR /opt/cicada
COPY pyproject.toml ./
COPY cicada_async ./cicada_async
COPY backends ./backends
COPY protocols ./protocols
# A regular (not editable) install byte-compiles every module into site-packages at build
# time: a container that compiled torch and transformers at start would pay seconds for it.
RUN touch README.md \
 && pip install --no-cache-dir ".[hf]" \
 && rm -rf /opt/cicada/build /root/.cache \
 && python -c "import cicada_async.service.server, transformers"

# A numeric, non-root user: Kubernetes' runAsNonRoot can only verify a numeric UID.
RUN groupadd --system --gid 10001 cicada \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent cicada \
 && mkdir -p /etc/cicada
COPY --chown=10001:10001 deploy/cicada.toml /etc/cicada/cicada.toml
USER 10001:10001
WORKDIR /tmp

EXPOSE 8080
# Exec form: cicada is PID 1 and receives SIGTERM itself (it installs handlers, then drains).
ENTRYPOINT ["cicada", "serve"]
CMD ["--config", "/etc/cicada/cicada.toml"]
