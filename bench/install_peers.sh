#!/usr/bin/env bash
# Create one venv per throughput peer under .venv-peers/NAME (git-ignored), for the peers whose pins do not fit
# the project's .venv (sentence-transformers' ONNX backend needs optimum-onnx, which pins transformers 4.x).
# Usage: bash bench/install_peers.sh [NAME ...]   (default: st-onnx fastembed infinity openvino)
# Then:  python -m bench.speed.throughput ... --peer-python st-onnx=.venv-peers/st-onnx/bin/python ...
# A peer whose install fails is left out; its pip log stays in .venv-peers/NAME.log and bench.speed.throughput reports
# the peer as skipped with that reason.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
ROOT=.venv-peers
mkdir -p "$ROOT"

requirements() {  # the pip requirements of each peer; torch is always the CPU build 2.13.0
    case "$1" in
        st-onnx) echo "torch==2.13.0 sentence-transformers[onnx] onnxruntime" ;;
        fastembed) echo "fastembed" ;;
        infinity) echo "torch==2.13.0 infinity-emb[torch]" ;;
        openvino) echo "torch==2.13.0 sentence-transformers[openvino] datasets" ;;
        *) echo "unknown peer $1 (choose from st-onnx fastembed infinity openvino)" >&2; return 1 ;;
    esac
}

names=("$@")
[ ${#names[@]} -eq 0 ] && names=(st-onnx fastembed infinity openvino)
status=0
for name in "${names[@]}"; do
    reqs=$(requirements "$name") || { status=2; continue; }
    venv="$ROOT/$name"
    log="$ROOT/$name.log"
    echo "== $name: $reqs (log: $log)"
    if [ ! -x "$venv/bin/python" ]; then
        "$PY" -m venv "$venv" || { status=1; continue; }
        "$venv/bin/pip" install -q --upgrade pip >"$log" 2>&1
    fi
    # torch first and alone, so that no dependency can pull a CUDA build
    if [[ " $reqs " == *" torch==2.13.0 "* ]]; then
        "$venv/bin/pip" install torch==2.13.0 >>"$log" 2>&1 || { echo "   FAILED (torch), see $log"; status=1; continue; }
    fi
    # shellcheck disable=SC2086
    if "$venv/bin/pip" install $reqs >>"$log" 2>&1; then
        # optimum-intel pulls PyPI's torchvision, which cannot load beside the CPU torch wheel ("operator
        # torchvision::nms does not exist") and then breaks every transformers model import; nothing here uses it
        [ "$name" = openvino ] && "$venv/bin/pip" uninstall -y torchvision >>"$log" 2>&1
        "$venv/bin/pip" freeze >"$venv/freeze.txt"
        echo "   ok: $("$venv/bin/python" --version)"
    else
        echo "   FAILED, see $log (last line: $(tail -n 1 "$log"))"
        status=1
    fi
done
exit $status
