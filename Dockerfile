# syntax=docker/dockerfile:1
# sriov-rdma-agent: one image for linux/amd64 and linux/arm64 (DGX Spark is arm64).
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t <registry>/sriov-rdma-agent:<version> --push .
#
# No step depends on the target architecture: apt picks the target's libudev1, and pip installs the
# wheels for the running interpreter from requirements.lock, which holds the sha256 of both arches'
# wheels (scripts/lock-requirements.py). The pure-Python wheel of the agent itself is built once, on
# the build host's platform, so cross builds emulate only the two install steps.
#
# The agent is privileged (it writes sriov_numvfs and talks RTNETLINK on the host), so it runs as root.
# At run time nothing in the image is written: bytecode is compiled at install time and
# PYTHONDONTWRITEBYTECODE stops Python from trying again, so readOnlyRootFilesystem: true works.
# To pin the base by digest as well, pass --build-arg PYTHON_IMAGE=python:3.11.17-slim-bookworm@sha256:<index digest>.
ARG PYTHON_IMAGE=python:3.11.17-slim-bookworm

FROM --platform=$BUILDPLATFORM ${PYTHON_IMAGE} AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements-build.lock ./
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY agent ./agent
RUN pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="sriov-rdma-agent" \
      org.opencontainers.image.description="Creates, watches and advertises RDMA-capable SR-IOV VFs (ConnectX-7/mlx5) to the kubelet" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# pyudev loads libudev.so.1 with ctypes at run time; the slim base does not ship it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libudev1=252.* \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    --mount=type=bind,from=wheel,source=/dist,target=/tmp/dist \
    pip install --no-cache-dir --require-hashes --only-binary=:all: --no-deps -r /tmp/requirements.lock \
 && pip install --no-cache-dir --no-index --no-deps /tmp/dist/sriov_rdma_agent-*.whl \
 && pip check \
 && sriov-rdma-agent --version
ENTRYPOINT ["sriov-rdma-agent", "serve"]
