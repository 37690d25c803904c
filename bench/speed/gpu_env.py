"""``python -m bench.speed.gpu_env --out FILE [--dry-run]``: what the GPU check ran on (its first step).

Versions of the packages that decide the figures, Python, the CPU (model, flags, load), the GPU as torch sees it
(name, capability, memory, CUDA), the hub setting (``HF_HUB_OFFLINE``: the check must never reach for a hub),
and an ``nvidia-smi`` snapshot of clocks, power and temperature, since a card held at low clocks or capped in
power gives figures that say nothing about the card. ``nvidia_smi()`` is also taken at the end of the check.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "tokenizers", "sentence-transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
            "tensorrt", "triton", "numpy")
# Clocks, power and what holds the clocks back; older drivers name the last field clocks_throttle_reasons.active.
SMI_FIELDS = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.draw", "power.limit", "temperature.gpu", "memory.used", "memory.total", "utilization.gpu")
SMI_REASONS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")


def nvidia_smi(timeout: float = 10.0) -> dict[str, Any]:
    """One ``nvidia-smi --query-gpu`` reading of every GPU, or why there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"available": False, "why": "nvidia-smi is not on PATH"}
    last_error = ""
    for reason in (*SMI_REASONS, None):
        fields = [*SMI_FIELDS, reason] if reason else list(SMI_FIELDS)
        try:
            res = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"available": False, "why": f"{type(exc).__name__}: {exc}"}
        if res.returncode == 0:
            gpus = [dict(zip(fields, (v.strip() for v in line.split(",")))) for line in res.stdout.splitlines() if line.strip()]
            return {"available": True, "units": "MHz, W, C, MiB, %", "gpus": gpus}
        last_error = (res.stdout + res.stderr).strip()[-300:]
    return {"available": False, "why": last_error}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def gpu_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_mib=round(props.total_memory / 2**20),
                    multiprocessors=props.multi_processor_count, device_count=torch.cuda.device_count())
    return info


def main(argv: list[str] | None = None) -> int:
    from bench.common import environment, write_json
    from bench.speed.gpu_measure import card_for

    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.speed.gpu_env", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--dry-run", action="store_true", help="record that this is the CPU dry run")
    args = p.parse_args(argv)
    info: dict[str, Any] = {"dry_run": args.dry_run, "python": platform.python_version(), "versions": versions(),
                            "hub": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}}
    info.update(gpu_info())
    info["card"] = card_for(info.get("gpu"))
    info["nvidia_smi"] = nvidia_smi()
    info["host"] = environment()
    write_json(args.out, info)
    print({k: info.get(k) for k in ("python", "gpu", "card", "capability", "torch_cuda", "dry_run")}, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
