"""``python -m bench.speed.gpu_compile_probe --workdir DIR [--shape large] [--precision bf16]``: what a ``.pt2``
build of INSTRUCTOR-large's shape costs in CPU time, phase by phase, on the machine it runs on.

The GPU check's time budget rests on the T5-large ``.pt2`` builds, which no GPU was at hand to time. Most of a build
is CPU work whatever the target: ``torch.export`` traces (twice for fp16/bf16, around the fp32-island pass) and
Inductor lowers, schedules and generates code in one Python thread; only the kernel compiles (C++ here, Triton on
a GPU) and the wrapper's C++ compile run in child processes. This probe times ``export.pt2.export_program`` and
``export.pt2.compile_package`` for the CPU and reports CPU seconds (the process's own and its children's) beside
wall seconds, so that a loaded machine still gives a usable figure, and Inductor's own phase timings. No parity
gate: ``python -m export`` does that; this measures cost only. Writes ``DIR/probe-SHAPE-PRECISION.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def cpu_now() -> tuple[float, float]:
    t = os.times()
    return t.user + t.system, t.children_user + t.children_system


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.speed.gpu_compile_probe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="folder for the checkpoint, the package and the JSON")
    p.add_argument("--shape", default="large", choices=("tiny", "base", "large"), help="model shape. Default: large")
    p.add_argument("--precision", default="bf16", choices=("fp32", "fp16", "bf16"), help="engine precision. Default: bf16")
    args = p.parse_args(argv)

    import torch
    from torch._dynamo.utils import compile_times

    from bench.common import environment, write_json
    from bench.shapes import make_checkpoint
    from export.pt2 import compile_package, export_program
    from trainer.model import InstructorModel

    out = args.workdir / f"probe-{args.shape}-{args.precision}.json"
    res: dict[str, Any] = {"torch": torch.__version__, "shape": args.shape, "precision": args.precision,
                           "compile_threads": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"), "environment": environment()}
    ckpt = args.workdir / f"ckpt-{args.shape}"
    if not (ckpt / "modules.json").is_file():
        t0 = time.perf_counter()
        make_checkpoint(args.shape, ckpt, 0)
        res["checkpoint_s"] = round(time.perf_counter() - t0, 1)
    model = InstructorModel.from_pretrained(ckpt)

    t0, (c0, k0) = time.perf_counter(), cpu_now()
    program, _ = export_program(model, "cpu", args.precision)
    (c1, k1) = cpu_now()
    res.update(export_s=round(time.perf_counter() - t0, 1), export_cpu_s=round(c1 - c0, 1), graph_nodes=len(program.graph.nodes))
    write_json(out, res)
    print(f"export: {res['export_s']} s wall, {res['export_cpu_s']} s CPU", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    compile_package(program, args.workdir / f"{args.shape}-{args.precision}.pt2")
    (c2, k2) = cpu_now()
    res.update(compile_s=round(time.perf_counter() - t0, 1), compile_cpu_s=round(c2 - c1, 1), compile_children_cpu_s=round(k2 - k1, 1))
    names, values = compile_times(repr="csv", aggregate=True)
    res["inductor_phases_wall_s"] = {name: round(float(v), 1) for name, v in zip(names, values) if float(v) >= 1.0}
    res["loadavg_end"] = os.getloadavg()
    write_json(out, res)
    print(f"compile: {res['compile_s']} s wall, {res['compile_cpu_s']} s CPU in process, {res['compile_children_cpu_s']} s in children", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
