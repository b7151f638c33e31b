#!/usr/bin/env bash
# The fuzz test of both APIs (tests/test_fuzz.py), long: N examples per property (default 5000,
# about 2 minutes here) with fresh random examples each run, against a real server.
#     bash benchmarks/fuzz.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
TORCHWIRE_FUZZ_EXAMPLES=${1:-5000} .venv/bin/pytest -q tests/test_fuzz.py -p no:cacheprovider
