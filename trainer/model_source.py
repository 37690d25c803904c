"""The local folder of a model named the way InstructorEmbedding users name it (``hkunlp/instructor-large``).

Nothing is ever downloaded. A folder is used as it is. A hub name is looked up where the original's stack left
its downloads, so that ``INSTRUCTOR('hkunlp/instructor-large')`` and upstream ``train.py --model_name_or_path
sentence-transformers/gtr-t5-large --cache_dir C`` find the copy a user already has:

- sentence-transformers 2.2.2's cache (what InstructorEmbedding 1.0.1 ran on): ``CACHE/hkunlp_instructor-large``
  (a name without an organization also as ``CACHE/sentence-transformers_NAME``), where CACHE is ``cache_folder``
  (train.py's ``--cache_dir``), else ``$SENTENCE_TRANSFORMERS_HOME``, else ``$TORCH_HOME/sentence_transformers``
  (default ``$XDG_CACHE_HOME/torch/sentence_transformers``, ``~/.cache/torch/sentence_transformers``);
- the Hugging Face hub cache (``models--hkunlp--instructor-large/snapshots/REVISION``) in ``cache_folder`` and
  in ``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``).

Anything else fails with a message saying to pass a local folder; an engine file (``.onnx``, ``.plan``, ``.pt2``)
with one naming ``runtime.INSTRUCTOR``, which runs engines.
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime.bundle import ENGINE_KINDS
from trainer.errors import ModelNotFoundError


def _st_cache(cache_folder: str | Path | None) -> Path:
    if cache_folder is not None:
        return Path(cache_folder)
    if os.environ.get("SENTENCE_TRANSFORMERS_HOME"):
        return Path(os.environ["SENTENCE_TRANSFORMERS_HOME"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("TORCH_HOME") or cache / "torch") / "sentence_transformers"


def _hub_caches(cache_folder: str | Path | None) -> list[Path]:
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    default = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    folders = ([Path(cache_folder)] if cache_folder is not None else []) + [default]
    return list(dict.fromkeys(folders))


def _snapshot(repo: Path) -> Path | None:
    """The revision ``refs/main`` names, else the only snapshot there is."""
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
        return repo / "snapshots" / ref.read_text().strip()
    snapshots = [p for p in (repo / "snapshots").glob("*") if p.is_dir()]
    return snapshots[0] if len(snapshots) == 1 else None


def candidates(name: str, cache_folder: str | Path | None = None) -> list[Path]:
    """Every folder where a hub name is looked for, in order."""
    ids = [name] if "/" in name else [f"sentence-transformers/{name}", name]
    st = _st_cache(cache_folder)
    found = [st / i.replace("/", "_") for i in ids]
    for hub in _hub_caches(cache_folder):
        found += [hub / ("models--" + i.replace("/", "--")) for i in ids if "/" in i]
    return found


def local_model_folder(name: str | Path, cache_folder: str | Path | None = None) -> Path:
    """``name`` itself if it is a folder, else its copy in a cache above; else a ``ModelNotFoundError`` saying what to pass."""
    path = Path(name)
    if path.is_dir():
        return path
    if path.suffix.lower() in ENGINE_KINDS:  # what `python -m export` writes: runs without PyTorch
        raise ModelNotFoundError(
            f"{name}: an exported engine, not a checkpoint folder: PyTorch (trainer.INSTRUCTOR, training, export) loads the "
            f"sentence-transformers folder it was exported from; to run the engine use `runtime.INSTRUCTOR({str(name)!r})` "
            "or `runtime.Encoder`"
        )
    if path.exists():
        raise ModelNotFoundError(f"{name}: a file, not a model folder (a sentence-transformers folder holding modules.json)")
    looked = []
    for folder in candidates(str(name), cache_folder):
        target = _snapshot(folder) if folder.name.startswith("models--") else folder
        if target is not None and (target / "modules.json").is_file():
            return target
        looked.append(str(folder))
    raise ModelNotFoundError(
        f"{name}: no such folder, and no model hub is contacted here (nothing is downloaded). Looked for it as a hub "
        f"name in: {', '.join(looked)}. Pass a local folder: download the model once where the hub is reachable "
        f"(e.g. `hf download {name} --local-dir path/to/model`) and give path/to/model."
    )
