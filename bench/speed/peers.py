"""Peers for ``bench.speed.throughput``: what a user would run instead of this project, each in its own process.

Every peer runs ``bench/speed/peer_worker.py`` under a Python that has its library: the project's own interpreter for
``st-torch`` (sentence-transformers is in the dev extra), a venv made by ``bash bench/install_peers.sh`` under
``.venv-peers/NAME`` for the others (their pins do not fit the project's), or any ``--peer-python NAME=PATH``.
The bench talks to it over a JSON-lines pipe (see the worker's doc), sends the corpus once, and times each
``encode`` call around the request, as it times its own contenders.

A peer that cannot start (no such venv, the library missing, a failed export) is skipped with the reason: the
install log's last error line when ``install_peers.sh`` failed for it. A peer whose vectors disagree with the
reference's (``agreement``: min cosine over the corpus below ``THRESHOLDS``) is marked as not counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.parity import calibration_inputs, compare

WORKER = Path(__file__).with_name("peer_worker.py")
PEERS = ("st-torch", "st-onnx", "st-onnx-qint8", "fastembed", "infinity", "st-openvino", "st-openvino-f32",
         "st-openvino-qint8")
VENV = {"st-torch": None, "st-onnx": "st-onnx", "st-onnx-qint8": "st-onnx", "fastembed": "fastembed", "infinity": "infinity",
        "st-openvino": "openvino", "st-openvino-f32": "openvino", "st-openvino-qint8": "openvino"}
PRECISION = {"st-onnx-qint8": "int8", "st-openvino-qint8": "int8"}  # every other peer is fp32 (st-openvino: the
# plugin's choice, maybe bf16, reported by the worker as inference_precision and gated as fp32)
THRESHOLDS = {"fp32": 0.999, "bf16": 0.999, "int8": 0.99}  # min cosine vs the reference before a time counts (our gates)
# no way to leave an instruction out of the mean (st-openvino and st-openvino-f32 pool in PyTorch after OpenVINO, so
# they can; st-openvino-qint8 is calibrated on plain texts)
PLAIN_TEXT = {"st-onnx", "st-onnx-qint8", "fastembed", "infinity", "st-openvino-qint8"}
UNSORTED = {"fastembed"}  # batches in input order (the others sort by length first): its padding is counted so
PEER_VENVS = Path(".venv-peers")


class PeerError(RuntimeError):
    """The peer cannot run here; the message says why (it is reported as the skip reason)."""


@dataclass
class Agreement:
    min_cosine: float
    mean_cosine: float
    threshold: float
    passed: bool


def agreement(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> Agreement:
    """Row-wise cosine of a peer's vectors with the reference's (the exporter's parity comparison: a NaN/inf row
    counts as cosine -1); shapes must match."""
    ref, cand = np.asarray(reference), np.asarray(candidate)
    if ref.shape != cand.shape:
        raise PeerError(f"vectors of shape {cand.shape}, expected {ref.shape}")
    parity = compare(ref, cand)
    return Agreement(parity.min_cos, parity.mean_cos, threshold, parity.min_cos >= threshold)


def parse_peer_python(values: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` pairs (NAME: a peer or a venv name such as ``st-onnx``) -> interpreter paths."""
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--peer-python {value!r}: expected NAME=PATH, e.g. st-onnx=.venv-peers/st-onnx/bin/python")
        out[name] = Path(path)
    return out


def python_for(peer: str, overrides: dict[str, Path], venvs: Path = PEER_VENVS) -> Path:
    """The interpreter to run ``peer`` with, or ``PeerError`` saying how to install it."""
    venv = VENV[peer]
    for key in (peer, venv):
        if key and key in overrides:
            if not overrides[key].exists():
                raise PeerError(f"--peer-python {key}={overrides[key]}: no such interpreter")
            return overrides[key]
    if venv is None:
        return Path(sys.executable)
    python = venvs / venv / "bin" / "python"
    if python.exists():
        return python
    reason = f"no venv {venvs / venv} (create it: bash bench/install_peers.sh {venv})"
    log = venvs / f"{venv}.log"
    if log.is_file():
        errors = [line.strip() for line in log.read_text(errors="replace").splitlines() if "ERROR" in line]
        if errors:
            reason = f"pip could not install it: {errors[-1]}"
    raise PeerError(reason)


class PeerProcess:
    """One running ``peer_worker.py``; ``request`` sends one JSON line and reads one back."""

    def __init__(self, peer: str, python: Path, log: Path) -> None:
        self.peer = peer
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._stderr = open(log, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )

    def request(self, **req: Any) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise PeerError(f"{self.peer}: the worker exited ({self._tail()})")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise PeerError(answer.get("error", "unknown error"))
        return answer

    def _tail(self) -> str:
        self._stderr.flush()
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else f"exit code {self.proc.poll()}"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


class Peer:
    """A loaded peer with its corpus: ``run()`` encodes it once, ``vectors()`` also returns what it computed."""

    def __init__(self, name: str, process: PeerProcess, info: dict[str, Any], workdir: Path) -> None:
        self.name = name
        self.process = process
        self.info = info
        self.workdir = workdir
        self.precision = PRECISION.get(name, "fp32")

    def run(self) -> float:
        return float(self.process.request(op="encode", out=None)["seconds"])

    def vectors(self) -> np.ndarray:
        out = self.workdir / f"{self.name}.vectors.npy"
        self.process.request(op="encode", out=str(out.resolve()))
        return np.load(out)

    def close(self) -> None:
        self.process.close()


def calibration_texts() -> list[str]:
    """The texts of the exporter's calibration set (golden probes and real sentences; the text of each
    [instruction, text(, flag)] row): a peer's static int8 export calibrates on what ours does, never on the timed
    corpus."""
    texts = [row[1] if isinstance(row, list) else row for row in calibration_inputs(0, 0)]
    return [t for t in texts if t.strip()]


def start(
    name: str,
    model_dir: Path,
    texts: list[str],
    prompt: str | None,
    workdir: Path,
    threads: int,
    batch_size: int,
    overrides: dict[str, Path],
) -> Peer:
    """Start and load one peer on ``texts``; ``PeerError`` when it cannot run here."""
    if name not in VENV:
        raise PeerError(f"unknown peer {name!r} (choose from {', '.join(PEERS)})")
    if prompt is not None and name in PLAIN_TEXT:
        raise PeerError("plain-text embedder: it cannot leave the instruction's tokens out of the mean (INSTRUCTOR)")
    python = python_for(name, overrides)
    process = PeerProcess(name, python, workdir / f"{name}.log")
    try:
        answer = process.request(op="load", peer=name, model_dir=str(Path(model_dir).resolve()), workdir=str(workdir.resolve()),
                                 threads=threads, batch_size=batch_size, prompt=prompt, calibration=calibration_texts())
        process.request(op="corpus", texts=texts)
    except PeerError:
        process.close()
        raise
    return Peer(name, process, {**answer["info"], "interpreter": os.path.relpath(python)}, workdir)
