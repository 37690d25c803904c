"""The built wheel works without the checkout: package data included, console scripts installed, export and encode
run from a fresh virtual environment (dependencies borrowed from this one, never the source tree)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next(out.glob("instructor_stack-*.whl"))


def test_the_wheel_holds_package_data_and_console_scripts(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {"export/data/calibration.json", "runtime/data/sample_corpus.jsonl", "bench/quality/mteb_instructions.json",
            "bench/speed/length_mix.json"} <= names
    for script in ("instructor-encode = runtime.encode:main", "instructor-export = export.__main__:main",
                   "instructor-train = trainer.__main__:main"):
        assert script in entry_points


def test_the_license_is_an_spdx_expression_with_no_build_warning(wheel):
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(w.message) for w in caught] == []
    with zipfile.ZipFile(wheel) as zf:
        metadata = next(zf.read(n).decode() for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in metadata


@pytest.mark.slow
def test_an_installed_wheel_exports_and_encodes_the_tiny_fixture(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # this environment's packages, as a plain path: its .pth files (the editable install of the checkout) stay inert
    (site / "borrowed-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                              "--no-deps", str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import export; print(export.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr  # the wheel's copy, not the checkout

    engine = tmp_path / "tiny.onnx"
    exported = subprocess.run([str(venv / "bin" / "instructor-export"), str(TINY), "--out", str(engine)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"text": "packaged"}) + "\n", encoding="utf-8")
    encoded = subprocess.run([str(venv / "bin" / "instructor-encode"), "--engine", str(engine), "--input", str(docs),
                              "--output", str(tmp_path / "o.npy"), "--quiet"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
    assert encoded.returncode == 0, encoded.stderr[-3000:]
    assert np.load(tmp_path / "o.npy").shape == (1, 32)
    helped = subprocess.run([str(venv / "bin" / "instructor-train"), "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--output_dir" in helped.stdout
