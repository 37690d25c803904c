"""``python -m bench.speed.gpu_parity --out FILE --workdir DIR --device cuda``: parity of ``.pt2`` engines (a step of
``bench/gpu_check.sh``).

Each engine is exported as ``bench.speed.gpu_build`` exports (``python -m export``'s own code, its parity gate against the
fp32 PyTorch model included) and then run by ``runtime.Encoder``:
- first, as it compiles nothing, the naive all-fp16 contrast: the overflow fixture's PyTorch model cast to fp16 as
  a whole (``model.half()``), expected to give inf/NaN rows or to miss the gate;
- the tiny fixture in bf16, fp16 and fp32, also against the golden vectors of InstructorEmbedding 1.0.1
  (fp32: max abs diff <= 1e-5; fp16/bf16: min cosine >= 0.999);
- the overflow fixture (``bench.shapes``: FF outputs ~4e5, past fp16's 65504) in fp16 and bf16: the fp32 islands.
Every result is written to ``--out`` as soon as it is known, so a step cut short by its time limit keeps what it
measured. ``--dry-run``: a smoke run of the same code on the CPU (the tiny fixture in fp16, and the contrast).
"""

from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.common import write_json
from bench.speed.gpu_build import build
from bench.shapes import TINY_FIXTURE, make_overflow_checkpoint

GOLDEN = TINY_FIXTURE.parent / "golden"
# After the no-compile contrast, most telling first: a step cut at its time limit loses the least (bf16 is the
# precision served; the overflow fixture in fp16 is what proves the fp32 islands).
ENGINES = [("tiny", "bf16"), ("tiny", "fp16"), ("overflow", "fp16"), ("tiny", "fp32"), ("overflow", "bf16")]
DRY_RUN_ENGINES = [("tiny", "fp16")]  # one compile: CI checks the plumbing (tests/test_pt2.py checks the rest on the CPU)


def golden_check(engine: Path, device: str, precision: str) -> dict[str, Any]:
    """The engine on the golden inputs against InstructorEmbedding 1.0.1's vectors."""
    from export.parity import GATES, check_gate, compare
    from runtime import Encoder

    inputs = [row["input"] for row in json.loads((GOLDEN / "inputs.json").read_text())]
    with Encoder(engine, device=device) as enc:
        vectors = enc.encode(inputs, batch_size=16)
    parity = compare(np.load(GOLDEN / "ie101.npy"), vectors)
    failures = check_gate(parity, GATES[precision])
    return {**parity.as_dict(), "gate": GATES[precision], "passed": not failures, "failures": failures}


def naive_fp16(ckpt: Path, device: str) -> dict[str, Any]:
    """The whole model in fp16 (no fp32 islands) against the fp32 model, on the calibration set."""
    from export.parity import GATES, calibration_inputs, check_gate, compare
    from trainer.model import InstructorModel

    model = InstructorModel.from_pretrained(ckpt)
    inputs = calibration_inputs(model.max_seq_length, 4)
    reference = model.encode(inputs, batch_size=16, device=device)
    vectors = model.half().encode(inputs, batch_size=16, device=device)
    parity = compare(reference, vectors)
    failures = check_gate(parity, GATES["fp16"])
    return {"status": "measured", "expect": "nonfinite rows or a failed gate", "what": "model.half(), PyTorch eager",
            **parity.as_dict(), "gate_passed": not failures, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.speed.gpu_parity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file of results (rewritten after every engine)")
    p.add_argument("--workdir", type=Path, required=True, help="folder for the overflow checkpoint and the engines")
    p.add_argument("--device", default="cuda", help="device the engines are built for and run on. Default: cuda")
    p.add_argument("--dry-run", action="store_true", help="smoke run: fewer engines (use with --device cpu)")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": args.device, "dry_run": args.dry_run, "engines": {},
                               "weights": "random weights (tiny test fixture, seed 1234; overflow: its wo scaled by 2**17)"}

    def record(key: str, measure: Callable[[], dict[str, Any]]) -> None:
        try:
            value = measure()
        except Exception as exc:  # keep going: one broken engine must not hide the others' figures
            value = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        results["engines"][key] = value
        write_json(args.out, results)
        print(f"{key}: {value.get('status')} {json.dumps(value.get('golden', value.get('export_gate', value.get('error', ''))))[:300]}", flush=True)

    overflow = args.workdir / "ckpt-overflow"
    if not (overflow / "modules.json").is_file():
        make_overflow_checkpoint(overflow)
    checkpoints = {"tiny": TINY_FIXTURE, "overflow": overflow}
    record("overflow-naive-fp16", lambda: naive_fp16(overflow, args.device))  # no compile: first, so it always lands
    for name, precision in DRY_RUN_ENGINES if args.dry_run else ENGINES:
        engine = args.workdir / f"{name}-{precision}.pt2"

        def measure(name: str = name, precision: str = precision, engine: Path = engine) -> dict[str, Any]:
            built = build(checkpoints[name], engine, precision, args.device)
            if built["status"] == "passed" and name == "tiny":
                built["golden"] = golden_check(engine, args.device, precision)
            return built

        record(f"{name}-{precision}.pt2", measure)
    results["status"] = "done"
    write_json(args.out, results)
    ok = all(v["status"] in ("passed", "measured") for v in results["engines"].values())
    return 0 if ok and all(v.get("golden", {}).get("passed", True) for v in results["engines"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
