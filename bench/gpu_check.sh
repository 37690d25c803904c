#!/usr/bin/env bash
# The one prepared GPU check: builds the project's GPU engines on a machine with a CUDA GPU and PyTorch, proves their
# parity and measures them. It installs nothing and needs no network: it runs from this checkout with the machine's
# own torch, transformers, onnx and onnxruntime (docs/benchmarks.md, "GPU check").
#
# Usage: bench/gpu_check.sh [--dry-run] DIR
#   DIR        every result goes here: one JSON per step as soon as it is measured, logs/, artifacts/ (checkpoints and
#              engines), and DIR/gpu_check.json, all of them merged (also after a step ran out of time).
#   --dry-run  every step on the CPU with the tiny shapes and one .pt2 (what CI runs): checks the script, not the GPU.
#
# Steps and time limits (seconds; each is also cut to what is left of the 470 s budget, so the whole run stays
# under 8 minutes):
#   env 20          versions, GPU name and capability                                    -> env.json
#   checkpoint 60   random-weight T5-large shape (python -m bench.shapes large)          -> artifacts/ckpt-large
#   in parallel, 250:
#     parity        .pt2 fp32/fp16/bf16 of the tiny fixture vs golden vectors, overflow fixture fp16/bf16,
#                   naive all-fp16 contrast (python -m bench.speed.gpu_parity)           -> parity.json
#     build-*       T5-large .pt2 fp16 and bf16, ONNX fp16 for ORT's CUDA EP, TensorRT .plan fp16; each
#                   recorded as skipped with the reason where its package is missing (python -m bench.speed.gpu_build)
#                                                                                        -> build-*.json
#   throughput 140  docs/hour + MFU at 128 and 512 tokens, batch-1 latency at 32 and 128 tokens, against the
#                   PyTorch fp32 reference (python -m bench.speed.gpu_steps)             -> throughput.json
set -uo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: bench/gpu_check.sh [--dry-run] DIR" >&2
  exit 2
fi
mkdir -p "$1/logs" "$1/artifacts" || exit 2
DIR=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=$(command -v python3 || command -v python)
BUDGET=470
START=$(date +%s)
: > "$DIR/steps.jsonl"

step() {  # step NAME SECONDS CMD...: run with a time limit (cut to the budget left), log, record status and duration
  local name=$1 limit=$2 left rc t0
  shift 2
  left=$(( BUDGET - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 5 )); then
    printf '{"step": "%s", "rc": null, "seconds": 0, "skipped": "time budget spent"}\n' "$name" >> "$DIR/steps.jsonl"
    return
  fi
  t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$DIR/logs/$name.log" 2>&1
  rc=$?
  tail -n 3 "$DIR/logs/$name.log"
  printf '{"step": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$DIR/steps.jsonl"
}

merge() {  # every step's JSON into DIR/gpu_check.json
  "$PY" - "$DIR" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
merged = {"steps": [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines() if l.strip()]}
for path in sorted(out.glob("*.json")):
    if path.name != "gpu_check.json":
        try:
            merged[path.stem] = json.loads(path.read_text())
        except ValueError as exc:  # a step killed while writing
            merged[path.stem] = {"status": "unreadable", "error": str(exc)}
(out / "gpu_check.json").write_text(json.dumps(merged, indent=2) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
PY
}

step env 20 "$PY" - "$DIR/env.json" "$DRY_RUN" <<'PY'
import importlib.metadata as md, json, platform, sys
info = {"python": platform.python_version(), "dry_run": sys.argv[2] == "1"}
for name in ("torch", "transformers", "tokenizers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy"):
    try:
        info[name] = md.version(name)
    except md.PackageNotFoundError:
        info[name] = None
import torch
info["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))), torch_cuda=torch.version.cuda)
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(info)
PY

if (( DRY_RUN )); then
  DEVICE=cpu
  SHAPE=tiny
  CKPT=tests/fixtures/instructor-tiny
  PARITY_FLAGS=(--dry-run)
  MEASURE_FLAGS=(--tokens 32 128 --latency-tokens 32 --docs-tokens 8192 --repeats 2 --latency-iters 10)
else
  DEVICE=cuda
  SHAPE=large
  CKPT="$DIR/artifacts/ckpt-large"
  PARITY_FLAGS=()
  MEASURE_FLAGS=()
  [[ -f "$CKPT/modules.json" ]] || step checkpoint 60 "$PY" -m bench.shapes large "$CKPT"
fi

step parity 250 "$PY" -m bench.speed.gpu_parity --out "$DIR/parity.json" --workdir "$DIR/artifacts" --device "$DEVICE" \
  ${PARITY_FLAGS[@]+"${PARITY_FLAGS[@]}"} &
build() {  # build NAME PRECISION: one engine of the checkpoint, in the background
  step "build-$1" 250 "$PY" -m bench.speed.gpu_build "$CKPT" "$DIR/artifacts/$SHAPE-$1" --precision "$2" --device "$DEVICE" \
    --out "$DIR/build-$1.json" &
}
if (( DRY_RUN )); then
  ENGINES=(--engine "pt2-fp16=$DIR/artifacts/tiny-fp16.pt2")  # the parity step's
else
  build fp16.pt2 fp16
  build bf16.pt2 bf16
  ENGINES=(--engine "pt2-fp16=$DIR/artifacts/large-fp16.pt2" --engine "pt2-bf16=$DIR/artifacts/large-bf16.pt2")
fi
build fp16.onnx fp16
build fp16.plan fp16
wait
ENGINES+=(--engine "onnx-fp16=$DIR/artifacts/$SHAPE-fp16.onnx" --engine "plan-fp16=$DIR/artifacts/$SHAPE-fp16.plan")

step throughput 140 "$PY" -m bench.speed.gpu_steps --out "$DIR/throughput.json" --checkpoint "$CKPT" --device "$DEVICE" \
  "${ENGINES[@]}" ${MEASURE_FLAGS[@]+"${MEASURE_FLAGS[@]}"}
merge
echo "gpu_check: $(( $(date +%s) - START ))s"
