# syntax=docker/dockerfile:1.7
# Ferry agent sidecar (injected by the operator's webhook). Build from the repository root:
#   docker build -f images/agent.Dockerfile -t ghcr.io/ferry-dev/ferry-agent:0.1.0 .
# torch and the nixl-cu12 wheels come from requirements.lock (exact versions);
# the CUDA user-space libraries come with the nvidia-* wheels torch pins, and
# the driver with the node (NVIDIA container toolkit). UCX, which NIXL uses,
# ships inside the nixl wheel. The runtime needs libibverbs/rdma-core for RDMA NICs.

FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock ./
RUN python -m venv /opt/ferry \
 && /opt/ferry/bin/pip install --no-deps -r requirements.lock
# Only the distributions that run here: ferry-api and ferry-agent (see pyproject.toml).
COPY crds ./crds
COPY agent ./agent
RUN /opt/ferry/bin/pip install --no-deps ./crds ./agent \
 && find /opt/ferry -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.source="https://github.com/ferry-dev/ferry" \
      org.opencontainers.image.title="ferry-agent" \
      org.opencontainers.image.licenses="Apache-2.0"
# RDMA user-space (verbs providers for mlx5, efa, ...); no compilers or headers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ibverbs-providers=44.0-2 libibverbs1=44.0-2 rdma-core=44.0-2 \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/ferry/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /opt/ferry /opt/ferry
# The injected container runs with runAsNonRoot and a read-only root filesystem;
# /dev/shm, /var/run/ferry and the token are volumes.
USER 65532:65532
EXPOSE 50051 9400
ENTRYPOINT ["ferry"]
CMD ["agent", "run"]
