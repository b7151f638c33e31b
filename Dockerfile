# syntax=docker/dockerfile:1
# torchwire server image: python:3.11-slim, CPU torch by default, non-root.
#
#   docker build -t torchwire:0.1.0 .                                   # CPU (download.pytorch.org/whl/cpu)
#   docker build -t torchwire:0.1.0-cuda \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .  # CUDA: any cu12x/cu13x index
#                                                                        # that has torch==2.13.0
#   docker run --rm -p 50051:50051 -p 8002:8002 torchwire:0.1.0         # demo models
#   docker run --rm -p 50051:50051 -v $PWD/models:/models:ro torchwire:0.1.0 --repository /models
#
# The CUDA wheels carry their CUDA runtime as nvidia-* pip packages, so the same slim base works
# on GPU nodes (host needs the NVIDIA driver + container toolkit: docker run --gpus all ...).
# podman/buildah: add --format docker, or the OCI format drops HEALTHCHECK.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a self-contained virtualenv in /opt/torchwire -------------------------------------
FROM ${PYTHON_IMAGE} AS build
# Where torch comes from: the CPU index by default. PyPI's Linux torch==2.13.0 is the CUDA build
# (several GiB of nvidia-* wheels), which a CPU server does not want.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/torchwire
WORKDIR /src
COPY constraints.txt ./
# torch alone from TORCH_INDEX (its own layer, cached until constraints.txt changes), without its
# dependencies: those come from PyPI in the next step under constraints.txt, so only torch is
# ever taken from the second index. torch==2.13.0 matches the local versions 2.13.0+cpu/+cu1xx.
RUN torch_pin="$(grep -E '^torch==' constraints.txt)" \
 && /opt/torchwire/bin/pip install --index-url "${TORCH_INDEX}" --no-deps "${torch_pin}"
COPY pyproject.toml README.md ./
COPY src ./src
# torchwire and every other dependency (including torch's own) from PyPI, pinned by constraints.txt;
# the torch installed above satisfies torch==2.13.0 and is kept.
RUN /opt/torchwire/bin/pip install -c constraints.txt . \
 && /opt/torchwire/bin/pip check \
 && /opt/torchwire/bin/python -c "import torch, torchwire; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="torchwire" \
      org.opencontainers.image.description="gRPC server for PyTorch models (ModelService + KServe V2)" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid (Kubernetes runAsNonRoot can only verify numeric users; the manifests
# in deploy/kubernetes use 10001). The demo repository is built into TORCHWIRE_CACHE_DIR at first
# start, so that directory must be writable by this user; mount a volume there to keep it.
RUN groupadd --gid 10001 torchwire \
 && useradd --uid 10001 --gid 10001 --home-dir /home/torchwire --create-home \
        --shell /usr/sbin/nologin torchwire \
 && install -d -o 10001 -g 10001 -m 0755 /var/cache/torchwire
COPY --from=build /opt/torchwire /opt/torchwire
ENV PATH=/opt/torchwire/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORCHWIRE_CACHE_DIR=/var/cache/torchwire \
    TORCHWIRE_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/torchwire
# gRPC (ModelService, inference.GRPCInferenceService, grpc.health.v1.Health) and /metrics.
EXPOSE 50051 8000 8002
# For `docker run` / compose only: Kubernetes ignores HEALTHCHECK and uses its own gRPC probes.
# The slim image has no grpc_health_probe, but grpcio-health-checking is a torchwire dependency,
# so a Python one-liner asks grpc.health.v1 for "" (SERVING only once the models are loaded, and
# not during shutdown or a memory-watchdog trip). It reads TORCHWIRE_PORT, so set the port with
# that variable rather than --port, and it speaks plaintext (no use with --tls-cert). The start
# period covers the first start, which builds the demo models.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel('127.0.0.1:' + os.environ.get('TORCHWIRE_PORT', '50051')); r = g.HealthStub(ch).Check(h.HealthCheckRequest(service=''), timeout=3); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
# Exec form: torchwire is PID 1 and gets SIGTERM itself (health NOT_SERVING, --shutdown-delay-s,
# then in-flight calls finish within --grace-period-s). Arguments given to `docker run` or a
# Kubernetes `args:` are appended as flags.
ENTRYPOINT ["torchwire", "serve"]
CMD []
