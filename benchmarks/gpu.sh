#!/usr/bin/env bash
# The GPU machine's measurements for --workers (issue 11): recsys with 1, 2, 4 and 8 workers and
# four separate processes, the open-loop rate under P99 < 50 ms, and resnet18 on the GPU against
# the same TorchScript file in-process (benchmarks/scaleout.py --gpu). Under 5 minutes.
#
# Here, first: ../shared/tools/gpu-wheels.sh   (our packages for the GPU machine's python3.12)
# Then one device call from the project root, carrying .whl:   bash benchmarks/gpu.sh
# Results go to $OUT (the device tool brings them back), else benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 benchmarks/scaleout.py --gpu --out "${OUT:-benchmarks/results}" "$@"
