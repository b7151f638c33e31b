#!/usr/bin/env bash
# Regenerate src/torchwire/_proto/ from proto/ (or, with --check, fail when it is stale).
# The include path maps proto/ to the package path torchwire/_proto, so protoc writes
# package-qualified imports and no file needs patching afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=src
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out/torchwire/_proto"
protos=()
for file in proto/*.proto; do protos+=("torchwire/_proto/$(basename "$file")"); done
# descriptors.binpb feeds server reflection from a private descriptor pool (see
# torchwire/server/reflection.py): the service file is never loaded into protobuf's default pool.
"$python" -m grpc_tools.protoc -Itorchwire/_proto=proto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  --descriptor_set_out="$out/torchwire/_proto/descriptors.binpb" --include_imports "${protos[@]}"
if [[ "${1:-}" == "--check" ]]; then
  for file in "$out"/torchwire/_proto/*; do
    if ! cmp -s "$file" "src/torchwire/_proto/$(basename "$file")"; then
      echo "stale generated code: src/torchwire/_proto/$(basename "$file") (run: make proto)" >&2
      exit 1
    fi
  done
  echo "generated protobuf code is up to date"
fi
