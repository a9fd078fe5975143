# syntax=docker/dockerfile:1
# condgen serving images: `condgen serve` over gRPC (port 50051) with Prometheus metrics (port 9090).
#
# Stages: `builder` builds the condgen wheel (setup.py generates the gRPC stubs from protos/ with
# grpcio-tools); `cpu` and `gpu` install that wheel and nothing of the build. No torch, no transformers.
#
#   docker build -t condgen .                        # default (last stage): GPU, CUDA 13 + cuDNN 9 runtime,
#                                                    #   onnxruntime-gpu (the `gpu` extra)
#   docker build --target cpu -t condgen:cpu .       # CPU: python:3.12-slim, onnxruntime (the `serve` extra)
#
# The bundle (the folder `condgen export` writes) is not in the image: mount it read-only at /bundle.
#
#   docker run --gpus all -p 50051:50051 -p 9090:9090 -v "$PWD/demo_out/bundle:/bundle:ro" condgen
#   docker run -p 50051:50051 -p 9090:9090 -v "$PWD/demo_out/bundle:/bundle:ro" condgen:cpu
#
# ENTRYPOINT is the fixed part (`condgen serve`); CMD holds the arguments, so passing arguments to
# `docker run IMAGE ...` replaces all of them: repeat --bundle /bundle --host 0.0.0.0 --port 50051,
# e.g. `docker run ... condgen --bundle /bundle --host 0.0.0.0 --port 50051 --max-batch-size 64`.
# The HEALTHCHECK asks the gRPC health service at 127.0.0.1:50051 over plaintext: it needs that
# port, and it fails under --tls-cert (use the orchestrator's own probes there).
# On SIGTERM the server reports NOT_SERVING and drains for --grace-seconds (default 30): stop it with
# `docker stop -t 45` (Docker's default is 10 s) so in-flight streams can finish.

# ---------------------------------------------------------------------------------------------
# builder: one pure-Python wheel, stubs included. Both runtime stages install this same wheel.
FROM python:3.12-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY condgen ./condgen
COPY server ./server
COPY client ./client
COPY training ./training
COPY bench ./bench
# Build requirements (setuptools, grpcio-tools) come from pyproject.toml's [build-system];
# a stale condgen/v1 from the build context is regenerated.
RUN rm -rf condgen/v1 build \
    && pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
# cpu: `docker build --target cpu`. onnxruntime (CPU) through the `serve` extra.
FROM python:3.12-slim AS cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# The wheel is bind-mounted from the builder (BuildKit), so it leaves no layer behind. Its
# dependencies follow pyproject.toml's ranges; the glob spares a version bump here.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && set -- /wheels/condgen-*.whl \
    && pip install "$1[serve]" \
    && groupadd --gid 10001 condgen \
    && useradd --create-home --uid 10001 --gid 10001 condgen

USER 10001:10001
WORKDIR /home/condgen
EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["condgen", "health", "--target", "127.0.0.1:50051"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["condgen", "serve"]
CMD ["--bundle", "/bundle", "--host", "0.0.0.0", "--port", "50051", "--device", "cpu", \
     "--metrics-port", "9090", "--log-format", "json"]

# ---------------------------------------------------------------------------------------------
# gpu (default, last stage): CUDA 13 + cuDNN 9 runtime, what onnxruntime-gpu 1.31 is built for.
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04 AS gpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Distribution packages follow the base image's release (Python 3.12 on Ubuntu 24.04); their
# exact versions are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# The `gpu` extra: onnxruntime-gpu instead of onnxruntime.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/venv \
    && set -- /wheels/condgen-*.whl \
    && pip install "$1[gpu]" \
    && groupadd --gid 10001 condgen \
    && useradd --create-home --uid 10001 --gid 10001 condgen

USER 10001:10001
WORKDIR /home/condgen
EXPOSE 50051 9090
# Loading a model onto a GPU takes longer than on a CPU: a longer start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["condgen", "health", "--target", "127.0.0.1:50051"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["condgen", "serve"]
CMD ["--bundle", "/bundle", "--host", "0.0.0.0", "--port", "50051", "--device", "auto", \
     "--metrics-port", "9090", "--log-format", "json"]
