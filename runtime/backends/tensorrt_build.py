"""ONNX -> TensorRT ``.plan``, strongly typed (the precision is the ONNX graph's; no FP16/BF16 builder flags).

It lives in the runtime, torch-free, because a worker may have to build: a ``.plan`` runs only on the GPU
architecture and TensorRT version it was built for, and a Ray actor on another card rebuilds the bundle's ``.plan``
from its ``PATH.onnx`` (``rebuild_for_this_gpu``). ``python -m export`` builds through the same function.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.files.atomic import atomic_write_bytes, atomic_write_text
from runtime.backends.cuda import current_device
from runtime.manifest_schema import seal
from runtime.bundle import (
    INPUT_NAMES,
    Manifest,
    cache_dir,
    manifest_path,
    sha256_file,
    source_onnx_path,
    tokenizer_path,
)

DEFAULT_TIMING_CACHE = cache_dir() / "tensorrt.timing-cache"
DEFAULT_PLAN_CACHE = cache_dir() / "plans"


@dataclass
class Profile:
    """The optimization profile: batch 1..max_batch and sequence 1..max_seq, tuned for (opt_batch, opt_seq)."""

    max_batch: int
    opt_batch: int
    max_seq: int
    opt_seq: int

    def check(self) -> None:
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"--opt-batch must be in 1..--max-batch ({self.max_batch}), got {self.opt_batch}")
        if not 1 <= self.opt_seq <= self.max_seq:
            raise ValueError(f"--opt-seq must be in 1..max_seq_length ({self.max_seq}), got {self.opt_seq}")

    def shapes(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        if name == "instruction_count":
            return (1,), (self.opt_batch,), (self.max_batch,)
        return (1, 1), (self.opt_batch, self.opt_seq), (self.max_batch, self.max_seq)

    def as_dict(self) -> dict[str, Any]:
        return {name: dict(zip(("min", "opt", "max"), map(list, self.shapes(name)))) for name in INPUT_NAMES}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Profile":
        ids = data["input_ids"]
        return cls(max_batch=ids["max"][0], opt_batch=ids["opt"][0], max_seq=ids["max"][1], opt_seq=ids["opt"][1])


def build_plan(onnx_path: Path, plan_path: Path, profile: Profile, timing_cache: Path, tf32: bool) -> dict[str, Any]:
    """Parse ``onnx_path`` into a strongly typed network, build it, write ``plan_path``; return the manifest fields."""
    import tensorrt as trt

    profile.check()
    device = current_device()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # always on (flag ignored) in TensorRT 11
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32") and not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    opt = builder.create_optimization_profile()
    for name in INPUT_NAMES:
        opt.set_shape(name, *profile.shapes(name))
    config.add_optimization_profile(opt)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # a cache from another GPU or TensorRT version (or a damaged file) is replaced, never trusted
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not build an engine (see the log above)")
    atomic_write_bytes(plan_path, bytes(serialized))
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {
        "tensorrt": {
            "version": trt.__version__,
            **device,
            "strongly_typed": True,
            "tf32": bool(tf32),
            "profile": profile.as_dict(),
            "timing_cache": str(timing_cache),
        }
    }


def rebuild_for_this_gpu(manifest: Manifest, plan_cache: Path = DEFAULT_PLAN_CACHE) -> Path:
    """Build ``manifest``'s ``.plan`` for this GPU and TensorRT from the bundle's ONNX, once; return the new bundle.

    The cached bundle is keyed by the source manifest's hash, the compute capability and the TensorRT version; its
    manifest says which bundle it was rebuilt from (its parity figures are those measured at export).
    """
    import tensorrt as trt

    src = source_onnx_path(manifest.engine)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: the bundle has no ONNX graph to rebuild its .plan from")
    device = current_device()
    key = f"{manifest.sha256[:16]}-sm{device['compute_capability'].replace('.', '')}-trt{trt.__version__}"
    plan = Path(plan_cache) / key / manifest.engine.name
    if manifest_path(plan).is_file():
        return plan
    old = manifest.data["tensorrt"]  # the plan is written atomically; the manifest, written last, marks it done
    fields = build_plan(src, plan, Profile.from_dict(old["profile"]), DEFAULT_TIMING_CACHE, bool(old.get("tf32", False)))
    shutil.copyfile(tokenizer_path(manifest.engine), tokenizer_path(plan))
    shutil.copyfile(src, source_onnx_path(plan))
    data = dict(manifest.data)
    data.update(fields)
    data["engine"] = {**data["engine"], "bytes": plan.stat().st_size, "sha256": sha256_file(plan)}
    data["rebuilt_from"] = {"engine": str(manifest.engine), "manifest_sha256": manifest.sha256}
    atomic_write_text(manifest_path(plan), json.dumps(seal(data), indent=2) + "\n")  # sealed anew: a changed bundle
    return plan
