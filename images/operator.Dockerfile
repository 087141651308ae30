# syntax=docker/dockerfile:1.7
# Ferry operator. Build from the repository root:
#   docker build -f images/operator.Dockerfile -t ghcr.io/ferry-dev/ferry-operator:0.1.0 .
# The operator needs kopf, kubernetes, pydantic, prometheus-client, aiohttp and
# cryptography only; torch and nixl stay out of this image.

FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock ./
# Exact versions from the lock, minus the agent's data-plane packages.
RUN grep -viE '^(torch|nixl|nvidia-|triton|numpy|sympy|networkx|mpmath|jinja2|markupsafe|fsspec|filelock)' \
        requirements.lock > operator.lock \
 && python -m venv /opt/ferry \
 && /opt/ferry/bin/pip install --no-deps -r operator.lock
# Only the distributions that run here: ferry-api and ferry-operator (see pyproject.toml).
COPY crds ./crds
COPY operator ./operator
RUN /opt/ferry/bin/pip install --no-deps ./crds ./operator \
 && find /opt/ferry -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.source="https://github.com/ferry-dev/ferry" \
      org.opencontainers.image.title="ferry-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
# Read-only root filesystem in the chart: no bytecode writes, unbuffered logs.
ENV PATH=/opt/ferry/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /opt/ferry /opt/ferry
USER 65532:65532
EXPOSE 8080 9443
ENTRYPOINT ["ferry"]
CMD ["operator", "run", "--all-namespaces"]
