#!/usr/bin/env bash
# Generates Python gRPC client stubs for every contract in proto/ into OUT_DIR.
#
# Usage: tests/python/gen_client.sh OUT_DIR
#
# Run from the repository root, this is exactly:
#   python -m grpc_tools.protoc -I proto --python_out=OUT_DIR --pyi_out=OUT_DIR \
#       --grpc_python_out=OUT_DIR $(find proto -name '*.proto')
# grpc_tools.protoc adds the well-known types (google/protobuf/*.proto) to the include path
# itself, so no protoc binary is needed. Modules land as OUT_DIR/tessera/<area>/v1/<area>_pb2.py
# (and _pb2_grpc.py, .pyi); put OUT_DIR on sys.path to import them.
#
# The interpreter is $PYTHON if set, else the repository's .venv (made by scripts/test), else
# python3; it needs grpcio-tools (tests/python/requirements.txt).
set -euo pipefail

if [[ $# -ne 1 || $1 == -* ]]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p -- "$1"
out=$(cd -- "$1" && pwd)

python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $root/.venv/bin/python ]]; then
        python=$root/.venv/bin/python
    else
        python=python3
    fi
fi

cd "$root"
mapfile -t protos < <(find proto -name '*.proto' | LC_ALL=C sort)
if [[ ${#protos[@]} -eq 0 ]]; then
    echo "$0: no .proto files under $root/proto" >&2
    exit 1
fi

"$python" -m grpc_tools.protoc -I proto \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    "${protos[@]}"
echo "generated Python stubs for ${#protos[@]} proto files into $out" >&2
