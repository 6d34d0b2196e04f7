# syntax=docker/dockerfile:1
# Worker: the model engine. Two targets:
#   docker build -f docker/worker.Dockerfile --target cpu  -t dynabatch-worker:dev-cpu .
#   docker build -f docker/worker.Dockerfile --target cuda -t dynabatch-worker:0.1.0-cuda .
# The CUDA target needs no nvidia/cuda base: torch's Linux wheels carry the CUDA user-space
# libraries, and the node's driver (libcuda) is mounted in by the NVIDIA container toolkit.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG TORCH_VERSION=2.13.0

# --- dependencies, CPU torch
FROM ${PYTHON_IMAGE} AS deps-cpu
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first: the biggest layer, independent of pyproject.toml edits.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install torch==${TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml docker/requirements.py /tmp/build/
RUN python /tmp/build/requirements.py /tmp/build/pyproject.toml --extra serve \
        --exclude torch matplotlib rich > /tmp/build/requirements.txt \
 && /opt/venv/bin/pip install -r /tmp/build/requirements.txt

# --- dependencies, CUDA torch (PyPI's default Linux wheel; another CUDA build:
#     --build-arg TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu128)
FROM ${PYTHON_IMAGE} AS deps-cuda
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install torch==${TORCH_VERSION} --index-url ${TORCH_CUDA_INDEX_URL}
COPY pyproject.toml docker/requirements.py /tmp/build/
RUN python /tmp/build/requirements.py /tmp/build/pyproject.toml --extra serve \
        --exclude torch matplotlib rich > /tmp/build/requirements.txt \
 && /opt/venv/bin/pip install -r /tmp/build/requirements.txt

# --- what both runtimes share
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 dynabatch \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/dynabatch dynabatch \
 && install -d -o 10001 -g 10001 /cache
# Every cache under /cache (an emptyDir in Kubernetes; the root filesystem is read-only there):
# Hugging Face downloads, Triton's compiled kernels, torch.compile's inductor artefacts.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor
EXPOSE 50052 9091
ENTRYPOINT ["python", "-m", "dynabatch.cli"]
CMD ["worker"]

# --- CPU worker
FROM runtime AS cpu
COPY --from=deps-cpu /opt/venv /opt/venv
COPY dynabatch/ /app/dynabatch/
USER 10001:10001

# --- CUDA worker (the default target)
FROM runtime AS cuda
# Triton compiles a small C launcher at first use: it needs a C compiler and libc headers
# (Python.h ships with the python image).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=deps-cuda /opt/venv /opt/venv
COPY dynabatch/ /app/dynabatch/
USER 10001:10001
