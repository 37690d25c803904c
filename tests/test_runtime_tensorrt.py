"""The TensorRT backend: its refusal of a .plan built for another TensorRT/GPU (runs anywhere), and golden vectors
through a real .plan (needs CUDA and TensorRT; skipped without them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.backends.tensorrt import build_target, check_build_target
from runtime.bundle import EngineError, Manifest


def fake_manifest(tensorrt: object) -> Manifest:
    data = {"engine": {"kind": "tensorrt"}}
    if tensorrt is not None:
        data["tensorrt"] = tensorrt
    return Manifest(engine=Path("/models/large.plan"), data=data)


def test_build_target_read_from_manifest():
    assert build_target(fake_manifest({"version": "10.9.0.34", "compute_capability": "8.9"})) == ("10.9.0.34", "8.9")
    assert build_target(fake_manifest({"version": "10.9.0.34", "compute_capability": [9, 0]})) == ("10.9.0.34", "9.0")
    with pytest.raises(EngineError, match="lacks tensorrt.version"):
        build_target(fake_manifest(None))


def test_plan_for_other_tensorrt_or_gpu_is_refused():
    manifest = fake_manifest({"version": "10.9.0.34", "compute_capability": "8.9"})
    check_build_target(manifest, "10.9.0.34", "8.9")
    with pytest.raises(EngineError, match=r"built with TensorRT 10.9.0.34, this is TensorRT 10.13.0.35.*large.plan.onnx"):
        check_build_target(manifest, "10.13.0.35", "8.9")
    with pytest.raises(EngineError, match="built for compute capability 8.9, this GPU is 9.0"):
        check_build_target(manifest, "10.9.0.34", "9.0")


def _gpu_or_skip() -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    from runtime.backends.cuda import cudart
    from runtime.deps import MissingDependency

    try:
        runtime_api = cudart()
    except MissingDependency:
        pytest.skip("cuda-python is not installed")
    err, count = runtime_api.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        pytest.skip("no CUDA GPU")


@pytest.mark.gpu
def test_plan_matches_golden_vectors(tmp_path, golden_inputs, golden_vectors):
    _gpu_or_skip()
    from export.build import ExportOptions, export_bundle
    from runtime.encoder import Encoder
    from tests.conftest import TINY

    from runtime.deps import MissingDependency

    plan = tmp_path / "tiny.plan"
    try:
        export_bundle(TINY, plan, ExportOptions(precision="fp16", timing_cache=tmp_path / "timing.cache"))
    except MissingDependency as exc:  # e.g. a CPU build of torch on a GPU machine
        pytest.skip(str(exc))
    manifest = json.loads(Path(f"{plan}.manifest.json").read_text())
    with Encoder(plan) as enc:
        assert enc.device == "cuda" and enc.backend.name.startswith("tensorrt")
        for batch_size in (1, 32):
            out = enc.encode(golden_inputs, batch_size=batch_size)
            assert out.shape == golden_vectors.shape and np.isfinite(out).all()
            cos = (out * golden_vectors).sum(axis=1) / np.maximum(
                np.linalg.norm(out, axis=1) * np.linalg.norm(golden_vectors, axis=1), 1e-30
            )
            zero = np.abs(golden_vectors).max(axis=1) == 0
            assert cos[~zero].min() >= 0.999, manifest["precision"]
