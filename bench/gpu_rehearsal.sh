#!/usr/bin/env bash
# The GPU check rehearsed on a CPU with the GPU image's own package versions, so that the one real run on a GPU
# machine does not meet an API change the project's .venv (a newer torch, transformers, onnxruntime) would hide.
#
# Usage: bench/gpu_rehearsal.sh [--setup-only] DIR OUT
#   DIR   artifacts of the dry run (checkpoints, engines, per-step JSON and logs)
#   OUT   the results bundle, as a GPU run writes it: gpu_check.json and logs.tgz
#   --setup-only   build the venv and stop (the download is the long part: torch 2.11.0 from PyPI is a CUDA build)
#
# It builds VENV (default .venv-gpu-rehearsal, git-ignored) with PYTHON (default python3.12: the image's Python is
# 3.12.3) and the versions pinned below, reusing it while the pins are unchanged, and then runs
# `bench/gpu_check.sh --dry-run DIR --bundle OUT` with that venv's python first on PATH. Exit code: the check's, or
# 3 when the venv cannot be built (no such Python, no registry).
set -uo pipefail

# Read on the GPU image ('cuda', nvidia-h100-x1 / nvidia-h200) in 2026-11: its python3 is 3.12.3 with these.
PINS=(
  torch==2.11.0 transformers==5.17.0 tokenizers==0.23.2 huggingface-hub==1.33.0 safetensors==0.8.0
  accelerate==1.15.0 sentence-transformers==6.0.1 onnx==1.23.1 onnxscript==0.7.2 onnx-ir==1.0.0
  onnxruntime==1.30.0 numpy==2.5.2 tqdm ml-dtypes
)

SETUP_ONLY=0
if [[ "${1:-}" == "--setup-only" ]]; then
  SETUP_ONLY=1
  shift
fi
if (( ! SETUP_ONLY )) && [[ $# -ne 2 || "$1" == -* || "$2" == -* ]]; then
  echo "usage: bench/gpu_rehearsal.sh [--setup-only] DIR OUT" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv-gpu-rehearsal}
PYTHON=${PYTHON:-python3.12}
STAMP="$VENV/.pins"
WANT=$(printf '%s\n' "${PINS[@]}")

t0=$(date +%s)
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  if ! "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    echo "gpu_rehearsal: no usable $PYTHON (set PYTHON=path/to/python3.12)" >&2
    exit 3
  fi
  echo "== building $VENV with $("$PYTHON" --version 2>&1): ${PINS[*]}"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" || exit 3
  "$VENV/bin/python" -m pip install -q --upgrade pip || exit 3
  "$VENV/bin/python" -m pip install -q "${PINS[@]}" || { echo "gpu_rehearsal: pip could not install the pins" >&2; exit 3; }
  printf '%s' "$WANT" > "$STAMP"
fi
echo "gpu_rehearsal: venv ready in $(( $(date +%s) - t0 ))s"
"$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|onnx|onnxruntime|sentence-transformers|numpy)==' | tr '\n' ' '
echo
(( SETUP_ONLY )) && exit 0

t1=$(date +%s)
PATH="$VENV/bin:$PATH" bash "$ROOT/bench/gpu_check.sh" --dry-run "$1" --bundle "$2"
rc=$?
echo "gpu_rehearsal: dry run exit $rc in $(( $(date +%s) - t1 ))s"
exit $rc
