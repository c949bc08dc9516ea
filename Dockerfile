# One image for every role of ctp; the command picks it:
#   docker run IMAGE ingest | train | serve | produce ... | status
# (ENTRYPOINT is `ctp`; a multi-GPU trainer overrides it: torchrun --nproc_per_node N -m service.cli train).
#
# Base: python:3.11-slim-bookworm, not nvidia/cuda. The PyPI torch==2.9.1 wheel is the CUDA 12.8
# build and brings its CUDA runtime, cuDNN and NCCL as nvidia-* wheels; what it needs from the host
# is only the driver, which the NVIDIA Container Toolkit mounts into any image when a GPU is
# reserved. An nvidia/cuda runtime base would add a second copy of the CUDA libraries (GBs) and an
# Ubuntu Python we do not use. The same image runs on CPU-only hosts (CTP_DEVICE=cpu).
#
# Build steps live in docker/install.sh (tests/test_deploy.py runs them outside Docker too).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# 1. dependencies: only pyproject.toml and the script are copied, so this layer (torch and the CUDA
#    wheels, most of the image) is rebuilt only when the dependencies change, not on a code change
COPY pyproject.toml /src/pyproject.toml
COPY docker/install.sh /src/docker/install.sh
RUN bash /src/docker/install.sh deps

# 2. the package itself (.dockerignore lets in only what the build needs: < 1 MB), installed (not
#    editable) and checked from the installed copy, then the non-root user; /src is not kept
COPY . /src
RUN bash /src/docker/install.sh package check --cuda user && rm -rf /src

# Settings come from CTP_ variables at run time (service/settings.py); none is secret here.
# /data holds chunks, checkpoints and caches: mount a volume on it.
ENV CTP_DATA_DIR=/data \
    CTP_API_HOST=0.0.0.0 \
    HF_HOME=/data/cache/huggingface \
    XDG_CACHE_HOME=/data/cache
WORKDIR /data
USER 10001:10001
EXPOSE 8000

# serve: GET /healthz; ingest/train: Redis answers; see docker/healthcheck.py
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["ctp-healthcheck"]

ENTRYPOINT ["ctp"]
CMD ["serve"]
