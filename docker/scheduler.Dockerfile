# syntax=docker/dockerfile:1
# Scheduler: gRPC front end, validation, batching policy. No torch: it only reads model configs and
# tokenizers (transformers works without torch), so the image is a fraction of a worker's.
#   docker build -f docker/scheduler.Dockerfile -t dynabatch-scheduler:dev .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- dependencies: rebuilt only when pyproject.toml (or this recipe) changes
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY pyproject.toml docker/requirements.py /tmp/build/
# torch and the benchmark-only packages stay out (the scheduler never imports them).
RUN python /tmp/build/requirements.py /tmp/build/pyproject.toml --extra serve \
        --exclude torch matplotlib rich > /tmp/build/requirements.txt \
 && /opt/venv/bin/pip install -r /tmp/build/requirements.txt

# --- runtime
FROM ${PYTHON_IMAGE}
# A fixed numeric uid so Kubernetes can verify runAsNonRoot (deploy/base: runAsUser 10001).
RUN groupadd --system --gid 10001 dynabatch \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/dynabatch dynabatch \
 && install -d -o 10001 -g 10001 /cache
# Caches live under /cache: an emptyDir in Kubernetes, where the root filesystem is read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface
COPY --from=deps /opt/venv /opt/venv
# The source last: a code change rebuilds only this small layer.
COPY dynabatch/ /app/dynabatch/
USER 10001:10001
EXPOSE 50051 9090
ENTRYPOINT ["python", "-m", "dynabatch.cli"]
CMD ["scheduler"]
