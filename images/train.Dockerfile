# syntax=docker/dockerfile:1.7
# The image of mmsae's GPU stages (cache, train, mine, steer; explain with the in-process backend):
# CUDA, torch, DeepSpeed and mmsae. Build from the repository root:
#   docker build -f images/train.Dockerfile -t ghcr.io/mmsae/mmsae-train:0.1.0 .
# Components name it through $MMSAE_TRAIN_IMAGE at compile time.
#
# Python 3.11 (the project's version) is a standalone build installed by uv into /opt/python, so the CUDA
# base image's own Python does not matter. DeepSpeed is installed as pure Python (DS_BUILD_OPS=0): the
# train stage uses torch's fused Adam and compiles no DeepSpeed op. Set DS_BUILD_OPS=1 to prebuild them
# with the devel image's nvcc.

ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.17

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------------- build
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION} AS build

ARG PYTHON_VERSION=3.11.13
# Pinned as in pyproject.toml; the PyPI wheel is torch's CUDA build and carries its CUDA libraries.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG DS_BUILD_OPS=0

COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=0 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --python "${PYTHON_VERSION}" /opt/venv \
 && uv pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
COPY components/ components/
COPY pipelines/ pipelines/
RUN DS_BUILD_OPS="${DS_BUILD_OPS}" uv pip install ".[train]" && mmsae --help > /dev/null

# ---------------------------------------------------------------------------------------------------- runtime
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu${UBUNTU_VERSION} AS runtime

LABEL org.opencontainers.image.title="mmsae-train" \
      org.opencontainers.image.description="mmsae GPU stages: CUDA, torch, DeepSpeed" \
      org.opencontainers.image.licenses="Apache-2.0"

ARG UID=10001
RUN groupadd --gid "${UID}" mmsae \
 && useradd --uid "${UID}" --gid mmsae --create-home --home-dir /home/mmsae --shell /usr/sbin/nologin mmsae

COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv

# KFP runs components as `python3 -m kfp.dsl.executor_main ...`: python3 must be the venv's. The caches of
# torch, triton and Hugging Face go under the user's home (or a volume mounted there).
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/mmsae \
    HF_HOME=/home/mmsae/.cache/huggingface \
    MLFLOW_DISABLE_TELEMETRY=true \
    NCCL_DEBUG=WARN

USER ${UID}:${UID}
WORKDIR /home/mmsae
CMD ["mmsae", "--help"]
