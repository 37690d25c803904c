"""Training checkpoints with no pickle in them: what an exact resume needs, in formats that cannot carry code.

Accelerate's ``save_state``/``load_state`` pickles the random states and registered objects and loads them with
``weights_only=False``, so a crafted checkpoint folder runs code on ``--resume_from_checkpoint``. A checkpoint here
is instead:

- ``model.safetensors``: the unwrapped model's weights (``safetensors.torch.save_model``: shared tensors handled);
- ``optimizer.pt``: the optimizer's state dict, read back with ``torch.load(weights_only=True)`` (tensors, numbers,
  strings, lists, tuples, dicts: torch's safe unpickler refuses any other global);
- ``scheduler.json``, ``scaler.json`` (fp16 only), ``train_state.json``: numbers, as JSON;
- ``rng-<rank>.safetensors`` (torch CPU and CUDA generators) and ``rng-<rank>.json`` (Python's and NumPy's), one
  pair per process.

``load_training_state`` refuses a folder holding any other file (a ``.pkl`` planted there, or a checkpoint of the
older Accelerate format) before it reads anything.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from runtime.atomic import atomic_write_text
from trainer.checkpoint import CheckpointError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"
TRAIN_STATE_FILE = "train_state.json"


def rng_files(rank: int) -> tuple[str, str]:
    return f"rng-{rank}.safetensors", f"rng-{rank}.json"


def _allowed(name: str, world: int) -> bool:
    fixed = {MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE, TRAIN_STATE_FILE}
    return name in fixed or any(name in rng_files(rank) for rank in range(world))


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's generator states: tensors (torch CPU, every CUDA device) and JSON (Python, NumPy)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    py = plain["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np_state = plain["numpy"]
    np.random.set_state((np_state["kind"], np.asarray(np_state["keys"], dtype=np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))


def save_training_state(folder: Path, rank: int, model: torch.nn.Module | None, optimizer: Any, scheduler: Any,
                        scaler: Any, train_state: dict[str, Any]) -> None:
    """Write this process's part of a checkpoint: the main process (``model`` given) writes the shared files."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, plain = capture_rng()
    tensor_file, json_file = rng_files(rank)
    save_file(tensors, str(folder / tensor_file))
    atomic_write_text(folder / json_file, json.dumps(plain))
    if model is None:
        return
    save_model(model, str(folder / MODEL_FILE))
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    atomic_write_text(folder / SCHEDULER_FILE, json.dumps(scheduler.state_dict()))
    if scaler is not None:
        atomic_write_text(folder / SCALER_FILE, json.dumps(scaler.state_dict()))
    atomic_write_text(folder / TRAIN_STATE_FILE, json.dumps(train_state, indent=1))


def load_training_state(folder: Path, rank: int, world: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                        scaler: Any) -> dict[str, Any]:
    """Restore a checkpoint written by ``save_training_state`` into this process; return its ``train_state``."""
    unknown = sorted(p.name for p in folder.iterdir() if not _allowed(p.name, world))
    if unknown:
        raise CheckpointError(
            f"{folder}: unexpected files {unknown}; a checkpoint of this trainer holds no pickles (or was written by "
            f"another number of processes or an older version), so it is not loaded"
        )
    tensor_file, json_file = rng_files(rank)
    for name in (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, TRAIN_STATE_FILE, tensor_file, json_file):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing from the checkpoint")
    try:
        optimizer_state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's safe unpickler refuses any global it does not allow, and runs none
        raise CheckpointError(f"{folder / OPTIMIZER_FILE}: refused by torch.load(weights_only=True) ({exc})") from exc
    try:
        train_state = json.loads((folder / TRAIN_STATE_FILE).read_text(encoding="utf-8"))
        scheduler_state = json.loads((folder / SCHEDULER_FILE).read_text(encoding="utf-8"))
        plain = json.loads((folder / json_file).read_text(encoding="utf-8"))
        scaler_state = json.loads((folder / SCALER_FILE).read_text(encoding="utf-8")) if scaler is not None else None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: unreadable training state ({exc})") from exc
    missing, unexpected = load_model(model, str(folder / MODEL_FILE), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder / MODEL_FILE}: does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    if scaler is not None:
        scaler.load_state_dict(scaler_state)
    restore_rng(load_file(str(folder / tensor_file)), plain)
    return train_state
