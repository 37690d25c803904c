#!/usr/bin/env bash
# The one prepared GPU check: eager baselines, then the project's GPU engines built, proved and measured on a machine
# with a CUDA GPU and PyTorch. It installs nothing and needs no network: it runs from this checkout with the
# machine's own torch, transformers, sentence-transformers, onnx and onnxruntime (docs/benchmarks.md, "GPU check").
#
# Usage: bench/gpu_check.sh [--dry-run] DIR --bundle OUT
#   DIR        work folder: per-step JSON, logs/, artifacts/ (checkpoints, engines, compiler caches; GBs)
#   --bundle   the results to keep: OUT/gpu_check.json, gpu_check.md and logs.tgz (3 files, each under 16 MiB),
#              rewritten after every step, so a run cut short still holds what it measured
#   --dry-run  every step on the CPU with the tiny fixture (what CI and bench/gpu_rehearsal.sh run)
# The steps, limits and budget (470 s: under 8 minutes) are in bench/speed/gpu_check.py; `--help` lists the options.
# Exit code: 0 every step passed; 2 bad usage; 3 no CUDA GPU (without --dry-run); 4 a step failed or ran out of
# time (the bundle says which, with everything measured before).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd) || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=$(command -v python3 || command -v python) || { echo "gpu_check: no python3 on PATH" >&2; exit 3; }
exec "$PY" -m bench.speed.gpu_check "$@"
