#!/usr/bin/env bash
# Build the Dockerfile with podman, run the image as the Kubernetes manifests do (non-root,
# read-only root filesystem), wait for its HEALTHCHECK, answer one request, stop it with SIGTERM
# and expect exit code 0. CI runs it after the tests (`make image-check`).
#
# It works where container registries cannot be reached (this project's machines reach only
# PyPI and Debian): the base image is then debootstrapped from Debian (python3.11, bookworm) and
# torch comes from a local CPU wheel in /opt/wheels when one is there. Elsewhere it uses
# python:3.11-slim-bookworm and download.pytorch.org, as `docker build .` does.
# Timings here: first run about 4 minutes (debootstrap 1 min, build 2 min), then about 1 minute.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/torchwire-image}
TAG=localhost/torchwire:check
NAME=torchwire-image-check
mkdir -p "$WORK"

if ! command -v podman >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        podman buildah runc debootstrap uidmap >/dev/null
fi
# crun, podman's default runtime, refuses this VM's hybrid cgroups; runc does not.
PODMAN=(podman --runtime runc)
# --health-interval disable: no systemd timer here; the script runs the check itself.
# podman run would raise RLIMIT_NOFILE/NPROC above what a nested VM allows.
LIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)

BASE=python:3.11-slim-bookworm
if ! timeout 60 podman pull -q "docker.io/library/$BASE" >/dev/null 2>&1; then
    BASE=localhost/python311-bookworm:local
    if ! podman image exists "$BASE"; then
        echo "no registry: building $BASE with debootstrap"
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase --include=python3-venv,python3-distutils,ca-certificates \
            bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log"; exit 1; }
        rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
        # This host's CAs (a proxy may re-sign TLS to PyPI); pip reads PIP_CERT.
        cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
        tar -C "$WORK/rootfs" -c . | podman import \
            --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' - "$BASE" >/dev/null 2>&1
    fi
fi

BUILD_ARGS=(--build-arg "PYTHON_IMAGE=$BASE")
VOLUMES=()
WHEEL=$(ls /opt/wheels/torch-"$(grep -E '^torch==' constraints.txt | cut -d= -f3)"+cpu-cp311-*.whl \
    2>/dev/null | head -1 || true)
if [[ -n "$WHEEL" ]]; then  # a one-package index over the local wheel
    rm -rf "$WORK/torchidx" && mkdir -p "$WORK/torchidx/torch"
    cp "$WHEEL" "$WORK/torchidx/torch/"
    printf '<a href="%s">%s</a>\n' "$(basename "$WHEEL")" "$(basename "$WHEEL")" \
        > "$WORK/torchidx/torch/index.html"
    BUILD_ARGS+=(--build-arg TORCH_INDEX=file:///torchidx)
    VOLUMES+=(-v "$WORK/torchidx:/torchidx:ro")
fi
# --format docker: the OCI format has no HEALTHCHECK.
"${PODMAN[@]}" build -q --format docker "${VOLUMES[@]}" "${BUILD_ARGS[@]}" -t "$TAG" . >/dev/null
echo "built $TAG ($(podman image inspect --format '{{.Size}}' "$TAG" | numfmt --to=iec))"

"${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
cleanup() { "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true; podman volume rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
"${PODMAN[@]}" run -d --name "$NAME" "${LIMITS[@]}" --health-interval disable --read-only -v "$NAME:/var/cache/torchwire" \
    -p 127.0.0.1::50051 "$TAG" >/dev/null
for _ in $(seq 90); do
    if "${PODMAN[@]}" healthcheck run "$NAME" >/dev/null 2>&1; then healthy=1; break; fi
    sleep 2
done
[[ -n "${healthy:-}" ]] || { podman logs "$NAME"; echo "the container never became healthy"; exit 1; }
TARGET=$(podman port "$NAME" 50051/tcp)
echo "healthy; serving on $TARGET"
.venv/bin/python -c "import numpy as np; np.save('$WORK/x.npy', np.ones((2, 256), np.float32))"
.venv/bin/torchwire predict --target "$TARGET" --model recsys --input "$WORK/x.npy"
"${PODMAN[@]}" stop -t 30 "$NAME" >/dev/null 2>&1
code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
[[ "$code" == 0 ]] || { podman logs "$NAME"; echo "exit code $code after SIGTERM"; exit 1; }
echo "stopped with SIGTERM: exit code 0"
