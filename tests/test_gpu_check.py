"""bench/gpu_check.sh: the dry run (every step on the CPU with tiny shapes) writes DIR/gpu_check.json; bad usage exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_usage_needs_a_folder(tmp_path):
    res = run_script(cwd=tmp_path)
    assert res.returncode == 2 and "usage: bench/gpu_check.sh [--dry-run] DIR" in res.stderr


@pytest.mark.slow
def test_dry_run_writes_gpu_check_json(tmp_path):
    res = run_script("--dry-run", "out", cwd=tmp_path)  # a relative DIR: the script changes folder itself
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert {"env", "parity", "build-fp16.onnx", "build-fp16.plan", "throughput"} <= set(steps)
    assert all(s["rc"] == 0 for s in steps.values()), steps
    assert report["env"]["dry_run"] is True

    engines = report["parity"]["engines"]
    tiny = engines["tiny-fp16.pt2"]
    assert tiny["status"] == "passed" and tiny["golden"]["passed"] and tiny["golden"]["min_cosine"] >= 0.999
    assert tiny["pt2"]["device"] == "cpu" and tiny["graph"]["low_precision"] == "float16"
    naive = engines["overflow-naive-fp16"]
    assert naive["nonfinite_rows"] > 0 or not naive["gate_passed"]  # the contrast: no fp32 islands, no parity

    assert report["build-fp16.onnx"]["status"] == "passed"
    results = report["throughput"]["results"]
    assert results["reference"]["128"]["docs_per_s"] > 0
    for name in ("pt2-fp16", "onnx-fp16"):
        assert results[name]["status"] == "measured", results[name]
        assert results[name]["128"]["docs_per_s"] > 0 and results[name]["128"]["ratio_to_reference"] > 0
        assert results[name]["batch1_latency_32"]["p50_ms"] > 0
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert report["build-fp16.plan"]["status"] == "skipped" and "tensorrt" in report["build-fp16.plan"]["reason"]
        assert results["plan-fp16"]["status"] == "skipped"
