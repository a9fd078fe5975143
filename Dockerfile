# condgen GPU serving image: CUDA 13 + cuDNN 9 runtime (what onnxruntime-gpu 1.31 is built for),
# onnxruntime-gpu, `condgen serve`.
# Build:  docker build -t condgen .
# Run:    docker run --gpus all -p 50051:50051 -v "$PWD/demo_out/bundle:/bundle:ro" condgen
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

# Distribution packages follow the base image's release; their exact versions are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY condgen ./condgen
COPY server ./server
COPY client ./client
COPY training ./training
# The build generates the gRPC stubs from protos/ (setup.py) and installs the serving extra
# with onnxruntime-gpu instead of onnxruntime. No torch, no transformers.
# hadolint ignore=DL3013
RUN pip install --no-compile ".[gpu]" && rm -rf /src/build

RUN useradd --create-home --uid 10001 condgen
USER 10001
WORKDIR /home/condgen
EXPOSE 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["condgen", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["condgen", "serve", "--bundle", "/bundle", "--host", "0.0.0.0", "--port", "50051", "--device", "auto"]
