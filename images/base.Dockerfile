# syntax=docker/dockerfile:1.7
# The image of mmsae's CPU stages (inputs, tracking, explain through a server, score, report), of the
# pipeline-upload job and of the chart's MLflow server. Build from the repository root:
#   docker build -f images/base.Dockerfile -t ghcr.io/mmsae/mmsae-base:0.1.0 .
# Components name it through $MMSAE_BASE_IMAGE at compile time.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

# Pinned as in pyproject.toml; the CPU build of torch (the PyPI default on Linux pulls CUDA).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The MLflow server's Postgres driver (the chart's MLflow runs in this image).
ARG PSYCOPG_VERSION=2.9.10

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install "psycopg2-binary==${PSYCOPG_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
COPY components/ components/
COPY pipelines/ pipelines/
RUN pip install . && mmsae --help > /dev/null

# ---------------------------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="mmsae-base" \
      org.opencontainers.image.description="mmsae CPU stages, pipeline tools and MLflow server" \
      org.opencontainers.image.licenses="Apache-2.0"

ARG UID=10001
RUN groupadd --gid "${UID}" mmsae \
 && useradd --uid "${UID}" --gid mmsae --create-home --home-dir /home/mmsae --shell /usr/sbin/nologin mmsae

COPY --from=build /opt/venv /opt/venv

# KFP runs components as `python3 -m kfp.dsl.executor_main ...`: python3 must be the venv's.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/mmsae \
    MLFLOW_DISABLE_TELEMETRY=true

USER ${UID}:${UID}
WORKDIR /home/mmsae
CMD ["mmsae", "--help"]
