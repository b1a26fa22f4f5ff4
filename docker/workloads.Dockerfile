# syntax=docker/dockerfile:1
# The four workloads (qtrader marketdata|inference|execution|portfolio), one image.
# Build from the repository root: docker build -f docker/workloads.Dockerfile -t quantum-trader-workloads:0.1.0 .
#
# No torch: the project is installed without the `train` extra; inference needs only
# onnxruntime. No tooling either (tools/: the simulator, stress scenarios, benchmarks): it is a
# distribution of its own, never installed here. The default model (card default.json and its
# members default.*.onnx) is baked in (package data, and a copy in /models); a volume mounted at
# /models overrides it (policy spec.model.ref: /models/<name>.json, or --model).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md docker/constraints.txt ./
COPY workloads ./workloads
COPY operator ./operator
# A regular (non-editable) install: the code and the model land in the venv's site-packages.
# Pinned closure (docker/constraints.txt): the same packages on every build.
RUN /opt/venv/bin/pip install -c constraints.txt . \
 && /opt/venv/bin/python -c "import qtrader.inference.onnx_model as m; m.SignalModel.load(m.default_model_path())" \
 && ! /opt/venv/bin/python -c "import torch" 2>/dev/null \
 && ! /opt/venv/bin/python -c "import qtrader_tools" 2>/dev/null
RUN mkdir -p /out/models \
 && cp workloads/qtrader/models/default.json workloads/qtrader/models/default.*.onnx /out/models/

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="quantum-trader-workloads" \
      org.opencontainers.image.source="https://github.com/quantum-trader/quantum-trader"
# Read-only root filesystem: no bytecode writes; temporary files and the outbox go to /tmp,
# which the pod mounts as an emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    QTRADER_HEALTH_PORT=8080 \
    QTRADER_OUTBOX_DIR=/tmp/qtrader-outbox
RUN groupadd --system --gid 10001 qtrader \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin qtrader
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /out/models /models
# Numeric, so the kubelet can verify runAsNonRoot.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["qtrader"]
CMD ["--help"]
