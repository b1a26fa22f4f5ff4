# syntax=docker/dockerfile:1
# The kopf operator (qtrader-operator). Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t quantum-trader-operator:0.1.0 .
# Configuration comes from the environment (QTRADER_NAMESPACE, QTRADER_NATS_URL,
# QTRADER_WORKLOAD_IMAGE, QTRADER_LIVENESS_URL); the chart sets it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md docker/constraints.txt ./
COPY workloads ./workloads
COPY operator ./operator
# The operator imports qtrader (contracts, the ESS state machine, the bus): one project, no
# `train` extra, so no torch, and no tooling (tools/ is a distribution of its own).
# Pinned closure (docker/constraints.txt): the same packages on every build.
RUN /opt/venv/bin/pip install -c constraints.txt . \
 && /opt/venv/bin/python -c "import qtrader_operator.main" \
 && ! /opt/venv/bin/python -c "import torch" 2>/dev/null \
 && ! /opt/venv/bin/python -c "import qtrader_tools" 2>/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="quantum-trader-operator" \
      org.opencontainers.image.source="https://github.com/quantum-trader/quantum-trader"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN groupadd --system --gid 10001 qtrader \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin qtrader
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8081
ENTRYPOINT ["qtrader-operator"]
