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

``check_files`` refuses a folder holding any other file (a ``.pkl`` planted there, or a checkpoint of the older
Accelerate format) before anything is read; every file read afterwards that is damaged (a truncated copy, a JSON
file edited by hand) is named in a one-line ``CheckpointError``.
"""

from __future__ import annotations

import json
import random
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from runtime.files.atomic import atomic_write_text
from trainer.checkpoint import CheckpointError
from trainer.divergence import weights_finite

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"
TRAIN_STATE_FILE = "train_state.json"


def rng_files(rank: int) -> tuple[str, str]:
    return f"rng-{rank}.safetensors", f"rng-{rank}.json"


_RNG_FILE = re.compile(r"rng-(0|[1-9][0-9]{0,5})\.(safetensors|json)")


def _allowed(name: str) -> bool:
    """A file this trainer writes (the random states of any number of processes: the settings check counts them)."""
    fixed = {MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE, TRAIN_STATE_FILE}
    return name in fixed or _RNG_FILE.fullmatch(name) is not None


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


def check_files(folder: Path) -> None:
    """Refuse a folder holding any file this trainer does not write, before anything in it is read."""
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError as exc:
        raise CheckpointError(f"{folder}: cannot list the checkpoint folder ({exc.strerror or exc})") from exc
    unknown = sorted(name for name in names if not _allowed(name))
    if unknown:
        raise CheckpointError(
            f"{folder}: unexpected files {unknown}; a checkpoint of this trainer holds no pickles (or was written by "
            f"an older version), so it is not loaded"
        )


def _damaged(path: Path, exc: BaseException) -> CheckpointError:
    why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return CheckpointError(
        f"{path}: damaged or not written by this trainer ({why}); resume from an earlier checkpoint or start again"
    )


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Any failure to read or apply ``path`` becomes one ``CheckpointError`` line naming it (the file is input)."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, torch and JSON each raise their own kinds on a bad file
        raise _damaged(path, exc) from exc


def _json_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    with _reading(path):
        return json.loads(path.read_text(encoding="utf-8"))


def _same_shape(saved: Any, current: Any) -> bool:
    """Whether JSON ``saved`` has the structure of ``current`` (keys, list lengths, number or string or null)."""
    if isinstance(current, dict):
        return isinstance(saved, dict) and saved.keys() == current.keys() and all(_same_shape(saved[k], current[k]) for k in current)
    if isinstance(current, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(current) and all(map(_same_shape, saved, current))
    if isinstance(current, bool) or current is None:
        return type(saved) is type(current)
    if isinstance(current, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool)
    return type(saved) is type(current)


def read_train_state(folder: Path) -> dict[str, Any]:
    """``train_state.json``, checked: ``{"step": int >= 0, "settings": {...}}``; a damaged file names itself."""
    path = folder / TRAIN_STATE_FILE
    state = _json_file(path)
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
        raise CheckpointError(f"{path}: damaged: expected an object with 'step' and 'settings'")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: damaged: field 'step' must be an integer >= 0, got {json.dumps(step)[:40]}")
    return state


def load_training_state(folder: Path, rank: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                        scaler: Any) -> None:
    """Restore the rest of a checkpoint (after ``check_files`` and ``read_train_state``) into this process.

    The optimizer, schedule, scaler and RNG files are read and checked before anything is applied, and each failure
    names its file: a truncated copy or a file edited by hand stops the run with one line, never a traceback;
    weights that are NaN are refused too.
    """
    tensor_file, json_file = rng_files(rank)
    for name in (MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, tensor_file, json_file):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing from the checkpoint")
    try:
        optimizer_state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's safe unpickler refuses any global it does not allow, and runs none
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{folder / OPTIMIZER_FILE}: refused by torch.load(weights_only=True) ({why})") from exc
    scheduler_state = _json_file(folder / SCHEDULER_FILE)
    if not _same_shape(scheduler_state, scheduler.state_dict()):
        raise CheckpointError(f"{folder / SCHEDULER_FILE}: damaged: not the state of this trainer's learning-rate schedule")
    scaler_state = _json_file(folder / SCALER_FILE) if scaler is not None else None
    if scaler is not None and not _same_shape(scaler_state, scaler.state_dict()):
        raise CheckpointError(f"{folder / SCALER_FILE}: damaged: not the state of a gradient scaler")
    plain = _json_file(folder / json_file)
    with _reading(folder / tensor_file):
        rng_tensors = load_file(str(folder / tensor_file))
    with _reading(folder / MODEL_FILE):
        missing, unexpected = load_model(model, str(folder / MODEL_FILE), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder / MODEL_FILE}: does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if not weights_finite(model.parameters()):
        raise CheckpointError(f"{folder / MODEL_FILE}: holds NaN or infinite weights (a diverged run); resume from an earlier checkpoint")
    with _reading(folder / OPTIMIZER_FILE):
        optimizer.load_state_dict(optimizer_state)
    with _reading(folder / SCHEDULER_FILE):
        scheduler.load_state_dict(scheduler_state)
    if scaler is not None:
        with _reading(folder / SCALER_FILE):
            scaler.load_state_dict(scaler_state)
    with _reading(folder / json_file):
        restore_rng(rng_tensors, plain)
