#!/usr/bin/env bash
# One prepared check for a lent GPU (H100/H200, no internet): installs the GPU extras from .whl/ (see
# bench/fetch_gpu_wheels.sh), then runs each step as `python -m bench.<module>`, which writes its own JSON under
# $OUT; the last step merges them into $OUT/gpu_check.json. Step limits (30 + 90 + 240 + 120 s) keep the whole run
# under 8 minutes; add a step by appending a `step NAME SECONDS python3 -m bench.MODULE ...` line.
#
# Usage: OUT=/some/dir bench/gpu_check.sh [--dry-run]   (SHAPES="tiny overflow base large" selects models)
#   --dry-run: no GPU needed (runs here): the same steps with CPU ONNX exports instead of TensorRT plans.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=""
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN="--dry-run"
PY="${PY:-python3}"
OUT="${OUT:-$PWD/runs/gpu_check}"
WORK="${WORK:-/tmp/gpu_check}"
SITE="${SITE:-/tmp/site}"
SHAPES="${SHAPES:-tiny overflow base large}"
[[ -n "$DRY_RUN" ]] && SHAPES="${DRY_SHAPES:-tiny overflow}"  # base/large on a CPU take too long for a smoke run
mkdir -p "$OUT" "$WORK"
export OUT
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export XDG_CACHE_HOME="$WORK/cache"  # the TensorRT timing cache persists there between steps
START=$(date +%s)
: > "$OUT/steps.jsonl"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, record status and duration
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s) rc
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 5 "$OUT/$name.log"
  printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.jsonl"
}

step env 30 "$PY" - <<'PY'
import json, os, platform, shutil, subprocess
info = {"python": platform.python_version()}
for mod in ("torch", "onnx", "onnxruntime", "transformers", "tensorrt"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:
        info[mod] = f"missing ({type(exc).__name__})"
if shutil.which("nvidia-smi"):
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
json.dump(info, open(os.path.join(os.environ.get("OUT", "."), "env.json"), "w"), indent=2)
print(info)
PY

if compgen -G ".whl/*.whl" > /dev/null; then
  step install 90 "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
else
  echo "== install: no wheels in .whl/ (bench/fetch_gpu_wheels.sh); using what python3 has"
fi

# parity gates of fp16/bf16 plans: tiny + overflow fixtures, random-weight base and large shapes
# shellcheck disable=SC2086  # SHAPES is a word list
step gpu_parity 240 "$PY" -m bench.gpu_parity --out "$OUT/gpu_parity.json" --workdir "$WORK" --shapes $SHAPES $DRY_RUN

# GPU throughput/latency (bench/gpu_steps.py): instructor-large shape, the fp16/bf16 plans gpu_parity built above
[[ -z "$DRY_RUN" ]] && step gpu_steps 120 "$PY" -m bench.gpu_steps --out "$OUT" --shape large \
  --checkpoint "$WORK/checkpoints/large" --plan fp16="$WORK/large-fp16.plan" --plan bf16="$WORK/large-bf16.plan" \
  --tokens 128 512 --docs-tokens 1048576 --repeats 3 --latency-iters 100 --workdir "$WORK/gpu_steps"

"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
merged = {"steps": [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines() if l.strip()]}
for path in sorted(out.glob("*.json")):
    if path.name != "gpu_check.json":
        merged[path.stem] = json.loads(path.read_text())
(out / "gpu_check.json").write_text(json.dumps(merged, indent=2) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
PY
echo "gpu_check: $(( $(date +%s) - START ))s"
