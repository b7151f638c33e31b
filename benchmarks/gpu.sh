#!/usr/bin/env bash
# The GPU machine's one call (16 cores, one GPU), under 5 minutes: benchmarks/gpu.py (resnet18 on
# the GPU: the GPU path's checks, the in-process ceiling, torchwire one process, padded batches
# and --workers, fp32/fp16, a py-spy profile; the seconds of each stage are in its report).
# With FORMATS=1, then benchmarks/formats.py --device cuda (recsys as TorchScript and as an
# AOTInductor package compiled there for CUDA, the vision Python model; about 1.5 minutes).
# With SCALEOUT=1, then benchmarks/scaleout.py --gpu (recsys with 1, 2, 4, 8 workers, four
# separate processes, the open-loop rate under P99 < 50 ms; measured on an H200 before: 3.5 min
# more).
#
# Here, first (our packages for its python3.12, versions as in constraints.txt):
#   ../shared/tools/gpu-wheels.sh py-spy==0.4.3 nvidia-ml-py==13.615.71 aiohttp==3.14.5 \
#     multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 frozenlist==1.8.0 aiosignal==1.4.0 \
#     aiohappyeyeballs==2.7.1 attrs==26.1.0 orjson==3.13.0
# Then one device call from the project root, carrying .whl:   bash benchmarks/gpu.sh
# Arguments go to gpu.py: e.g. --stages jit --batch-seconds 2 (TorchScript settings at changing
# batch sizes only, about a minute), or --diagnose (what bounds one process).
# ENGINE=1 bash benchmarks/gpu.sh runs benchmarks/engine.py --device cuda alone instead (about 3
# minutes): resnet18 from one process, from --engine on with 1, 2, 4, 8 workers (one copy of the
# model on the GPU: the GPU memory in use is in the table) and from 4 whole-server workers.
# TORCHWIRE_GRPC_IO_THREADS=1 (or 2) in front of any of these sets the native front end's HTTP/2
# threads of every server it starts (default: 2 for one process on 16 cores, 1 per worker under
# --workers 3 or more; 1 paid on 2 cores, never measured here: docs/frontends.md, "I/O threads").
# SCALEOUT_ARGS (e.g. "--sweep-workers 0") go to scaleout.py. With CPU=1, then
# benchmarks/cpu_by_thread.py for issue 28's CPU per recsys answer at 800/s open loop on this
# quieter host: a bare grpc.aio echo, torchwire, torchwire on grpc.aio, two rounds each, in
# turns (printed; about two minutes). Results go to $OUT (the device tool brings them back), else
# benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH
# A wheel missing from .whl (e.g. orjson) would fail every server at import: stop here instead.
# pygrpc_native too: without it every run would measure the grpc.aio front end, not the default.
python3 -c "import torchwire.server.process.app, tritonclient.grpc, pygrpc_native" || { echo "missing wheels: see the header"; exit 1; }
out=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [[ "${ENGINE:-0}" == 1 ]]; then
  timeout 280 python3 benchmarks/engine.py --device cuda --parts images --seconds 6 --rounds 1 \
      --callers 64 --out "$out"
  echo "engine.py exit $?"
  exit 0
fi
timeout 300 python3 benchmarks/gpu.py --profile --out "$out" "$@"; echo "gpu.py exit $?"
if [[ "${FORMATS:-0}" == 1 ]]; then  # recsys TorchScript vs AOTInductor, vision, on the GPU
  timeout 150 python3 benchmarks/formats.py --device cuda --seconds 2 --out "$out"
  echo "formats.py exit $?"
fi
if [[ "${SCALEOUT:-0}" == 1 ]]; then
  timeout 210 python3 benchmarks/scaleout.py --gpu --out "$out" ${SCALEOUT_ARGS:-}
  echo "scaleout.py exit $?"
fi
if [[ "${CPU:-0}" == 1 ]]; then  # server CPU per answer: torchwire against the echo and grpc.aio
  for server in echo torchwire torchwire-aio echo torchwire torchwire-aio; do
    timeout 60 python3 benchmarks/cpu_by_thread.py --server "$server" --load unary --rate 800 \
        --rounds 1 --model recsys | tail -1
  done
fi
