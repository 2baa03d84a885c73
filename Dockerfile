# syntax=docker/dockerfile:1
#
# UU-Mamba GPU image: `uumamba serve` on port 8000 by default; every other `uumamba` command
# (train, predict, evaluate, export-slicer) by naming it after the image.
#
#   docker build --build-arg TORCH_CUDA_ARCH_LIST="8.0;9.0" -t uumamba:gpu .
#   docker run --gpus all -p 8000:8000 -v "$PWD/runs:/models" \
#       -e UUMAMBA_API_KEY="$(openssl rand -hex 32)" -e UUMAMBA_ALLOWED_HOSTS=seg.example.org \
#       uumamba:gpu
#
# An API key is required: the server listens on 0.0.0.0 inside the container, and
# `uumamba serve` refuses a non-loopback address without UUMAMBA_API_KEY (clients send it as
# the X-API-Key header). UUMAMBA_ALLOWED_HOSTS lists the Host names clients use (default:
# localhost, 127.0.0.1, ::1 and the container's host name). Put a TLS terminator in front;
# the service speaks plain HTTP. `--insecure-no-auth` after the image name's CMD turns the
# key check off; never do that on a shared network.
#
# Stage "build" compiles the mamba-ssm and causal-conv1d CUDA extensions against the exact
# torch build the runtime stage installs: a wheel compiled against another torch fails at
# import with "undefined symbol". The packages' FORCE_BUILD switches stop their setup.py from
# fetching prebuilt binaries, --no-build-isolation makes them compile against the torch
# installed here (not a fresh one in an isolated build env), and only the GPU architectures
# named by TORCH_CUDA_ARCH_LIST are compiled (all of them takes over an hour).

# Versions shared by both stages. torch must satisfy pyproject.toml's "torch>=2.6"; its cu124
# wheels match the CUDA 12.4 images below. mamba-ssm / causal-conv1d are the gpu extra's
# packages, pinned inside its ranges (pyproject explains each bound):
# - mamba-ssm 2.3.1: 2.3 is the first line that imports beside transformers 5 (2.2.x imports
#   the removed GreedySearchDecoderOnlyOutput in its __init__, and its transformers requirement
#   is unpinned, so pip resolves transformers 5); 2.3.1 is its last release before 2.3.2.post1,
#   which needs tilelang / quack-kernels and triton >= 3.5 (not torch 2.6's triton 3.2).
# - causal-conv1d 1.5.3.post1: has the cpp_functions module mamba-ssm >= 2.2.5 calls
#   (first in 1.5.1), and builds against torch 2.6 (torch.library.custom_op, torch >= 2.4).
# Their sdists ship the CUDA sources.
ARG TORCH_VERSION=2.6.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
ARG MAMBA_SSM_VERSION=2.3.1
ARG CAUSAL_CONV1D_VERSION=1.5.3.post1

############################ build: CUDA toolkit, torch, extension wheels ####################
FROM nvidia/cuda:12.4.1-devel-ubuntu22.04 AS build

ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ARG MAMBA_SSM_VERSION
ARG CAUSAL_CONV1D_VERSION
# Compute capabilities to compile for: 8.0 A100, 8.6 RTX 30xx / A40, 8.9 L4 / RTX 40xx,
# 9.0 H100 / H200. Fewer = faster build.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0"
# Parallel nvcc jobs; each can take several GB of RAM.
ARG MAX_JOBS=4

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN pip install --no-cache-dir pip==24.3.1 setuptools==75.6.0 wheel==0.45.1 packaging==24.2 ninja==1.11.1.3 \
 && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    MAMBA_FORCE_BUILD=TRUE \
    CAUSAL_CONV1D_FORCE_BUILD=TRUE

# Both setup.py files hard-code a -gencode list (sm_53 ... sm_120); torch's extension builder
# ignores TORCH_CUDA_ARCH_LIST whenever such flags are present. Replace those appends with
# `pass` so the architectures come from the build argument, and fail if any remain.
WORKDIR /src
RUN pip download --no-cache-dir --no-deps --no-binary :all: --no-build-isolation -d /src/sdist \
        "causal-conv1d==${CAUSAL_CONV1D_VERSION}" "mamba-ssm==${MAMBA_SSM_VERSION}" \
 && for archive in /src/sdist/*.tar.gz; do tar -xzf "${archive}" -C /src; done \
 && sed -i -E 's/cc_flag\.append\("(-gencode|arch=compute_[0-9a-z]+,code=sm_[0-9a-z]+)"\)/pass/' /src/*/setup.py \
 && if grep -n 'arch=compute_' /src/*/setup.py; then echo "unpatched -gencode flags" >&2; exit 1; fi \
 && pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels \
        "/src/causal_conv1d-${CAUSAL_CONV1D_VERSION}" "/src/mamba_ssm-${MAMBA_SSM_VERSION}"

############################ runtime: CUDA runtime, torch, wheels, uumamba[gpu] #############
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04 AS runtime

ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ARG MAMBA_SSM_VERSION
ARG CAUSAL_CONV1D_VERSION

LABEL org.opencontainers.image.title="uumamba" \
      org.opencontainers.image.description="UU-Mamba cardiovascular segmentation: CLI and REST service (GPU)" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# gcc and Python headers: Triton (used by mamba-ssm's fused kernels) compiles a small launcher
# the first time a kernel runs.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The same torch the extensions were compiled against, pinned for every later install.
COPY --from=build /wheels /wheels
RUN echo "torch==${TORCH_VERSION}" > /opt/constraints.txt \
 && pip install --no-cache-dir pip==24.3.1 \
 && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir --no-index --no-deps --find-links /wheels \
        "mamba-ssm==${MAMBA_SSM_VERSION}" "causal-conv1d==${CAUSAL_CONV1D_VERSION}"

# The package with its gpu extra (and the queue extra for --broker); the extra's two packages are already installed from /wheels
# (found there again through --find-links), their pure-Python dependencies come from PyPI.
WORKDIR /opt/uumamba
COPY . /opt/uumamba
# Build check: the extensions load, the whole mamba_ssm package imports (its __init__ pulls in
# transformers; an incompatible pair fails here, not at run time), and, when the build sees a
# GPU (BuildKit with one attached), uumamba's probe runs selective_scan_fn and
# causal_conv1d_fn once on it and compares them with the PyTorch reference. Without a GPU at
# build time the imports are the check; `uumamba serve` logs and /readyz report any fallback.
RUN pip install --no-cache-dir --constraint /opt/constraints.txt --find-links /wheels "/opt/uumamba[gpu,queue]" \
 && python -c "import torch, selective_scan_cuda, causal_conv1d_cuda, mamba_ssm, causal_conv1d; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'mamba_ssm', mamba_ssm.__version__, 'causal_conv1d', causal_conv1d.__version__)" \
 && python -c "import sys, torch; from uumamba.nn.ops.selective_scan import probe_cuda_kernels; gpu = torch.cuda.is_available(); r = probe_cuda_kernels(0) if gpu else None; print('kernel probe:', 'no GPU at build time, imports only' if not gpu else (r.reason or 'selective_scan_fn and causal_conv1d_fn ran on ' + torch.cuda.get_device_name(0))); sys.exit(1 if gpu and (r.reason or not r.causal_conv1d) else 0)" \
 && rm -rf /wheels

# Non-root user "uumamba", UID/GID 1000 (numeric below, so runtimes can check it is not root).
RUN groupadd --gid 1000 uumamba \
 && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash uumamba \
 && mkdir -p /models /state \
 && chown uumamba:uumamba /models /state

# Caches under /tmp so any --user UID (matching a mounted folder's owner) can write them.
# Jobs are stored in /state (a volume: they survive a container restart).
ENV UUMAMBA_MODEL=/models/model \
    UUMAMBA_STATE_DIR=/state \
    UUMAMBA_HOST=0.0.0.0 \
    UUMAMBA_PORT=8000 \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba \
    TRITON_CACHE_DIR=/tmp/triton

USER 1000:1000
WORKDIR /home/uumamba
VOLUME ["/models", "/state"]
EXPOSE 8000

# /readyz, not /healthz: a model that failed to load (corrupt checkpoint, wrong folder) keeps
# the process alive but cannot serve, and Docker should show the container as unhealthy.
# The start period covers model loading (readyz answers 503 "loading" until then).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('UUMAMBA_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["uumamba"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--model", "/models/model"]
