"""Throughput peers: the agreement check, how a peer's interpreter is found, and that a peer that is not installed
is skipped with the reason rather than failing the benchmark. No timing is asserted."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from bench.speed import peers
from bench.common import DOC_INSTRUCTION, padded_tokens_in_order
from tests.conftest import TINY


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_agreement_passes_equal_vectors_up_to_scale():
    ref = unit_rows(5, 8, 0)
    a = peers.agreement(ref, 3.0 * ref, 0.999)  # unnormalized peers (e.g. no Normalize module) still agree
    assert a.passed and a.min_cosine == pytest.approx(1.0) and a.mean_cosine == pytest.approx(1.0)


def test_agreement_fails_on_one_bad_row_and_reports_it():
    ref = unit_rows(5, 8, 0)
    cand = ref.copy()
    cand[3] = ref[3] + 0.2 * unit_rows(1, 8, 1)[0]  # cos about 0.98 on one row
    a = peers.agreement(ref, cand, 0.999)
    expected = float(ref[3] @ cand[3] / np.linalg.norm(cand[3]))
    assert not a.passed and a.min_cosine == pytest.approx(expected) and a.min_cosine < 0.999
    assert peers.agreement(ref, cand, 0.95).passed  # the int8 threshold is looser


def test_agreement_refuses_nan_and_shape_mismatch():
    ref = unit_rows(3, 4, 0)
    bad = ref.copy()
    bad[1, 2] = np.nan
    assert not peers.agreement(ref, bad, 0.5).passed
    with pytest.raises(peers.PeerError, match=r"shape \(3, 5\), expected \(3, 4\)"):
        peers.agreement(ref, unit_rows(3, 5, 0), 0.5)


def test_parse_peer_python():
    assert peers.parse_peer_python(["st-onnx=/x/bin/python", "fastembed=py"]) == {"st-onnx": peers.Path("/x/bin/python"), "fastembed": peers.Path("py")}
    with pytest.raises(ValueError, match="expected NAME=PATH"):
        peers.parse_peer_python(["st-onnx"])


def test_python_for_names_the_install_command_or_pips_reason(tmp_path):
    assert peers.python_for("st-torch", {}, tmp_path) == peers.Path(sys.executable)
    with pytest.raises(peers.PeerError, match="bash bench/install_peers.sh infinity"):
        peers.python_for("infinity", {}, tmp_path)
    (tmp_path / "infinity.log").write_text("Collecting x\nERROR: No matching distribution found for infinity-emb\n")
    with pytest.raises(peers.PeerError, match="pip could not install it: ERROR: No matching distribution found"):
        peers.python_for("infinity", {}, tmp_path)
    with pytest.raises(peers.PeerError, match="no such interpreter"):
        peers.python_for("st-onnx-qint8", {"st-onnx": tmp_path / "missing"}, tmp_path)
    (tmp_path / "fastembed" / "bin").mkdir(parents=True)
    (tmp_path / "fastembed" / "bin" / "python").write_text("")
    assert peers.python_for("fastembed", {}, tmp_path) == tmp_path / "fastembed" / "bin" / "python"


def test_a_peer_that_is_not_installed_is_skipped_with_the_reason(tmp_path):
    pytest.importorskip("sentence_transformers")
    if __import__("importlib.util").util.find_spec("fastembed") is not None:
        pytest.skip("fastembed is installed in this interpreter")
    with pytest.raises(peers.PeerError, match="No module named 'fastembed'"):
        peers.start("fastembed", TINY, ["x"], None, tmp_path, 1, 4, {"fastembed": peers.Path(sys.executable)})


def test_plain_text_peers_refuse_instructions(tmp_path):
    with pytest.raises(peers.PeerError, match="cannot leave the instruction"):
        peers.start("st-onnx", TINY, ["x"], DOC_INSTRUCTION, tmp_path, 1, 4, {})


def test_st_torch_peer_over_the_protocol_agrees_with_the_reference(tiny_model, tmp_path):
    pytest.importorskip("sentence_transformers")
    texts = ["a short text", "Yams are perennial herbaceous vines.", "the committee approved the budget " * 5]
    peer = peers.start("st-torch", TINY, texts, DOC_INSTRUCTION, tmp_path, 1, 2, {})
    try:
        vectors = peer.vectors()
        seconds = peer.run()
    finally:
        peer.close()
    assert peer.process.proc.returncode == 0 and seconds > 0
    assert "sentence-transformers" in peer.info["library"]
    reference = tiny_model.encode([[DOC_INSTRUCTION, t] for t in texts])
    assert peers.agreement(reference, vectors, peers.THRESHOLDS["fp32"]).min_cosine > 0.99999


def test_padding_in_input_order():
    # batches of 2 in input order: [3, 10] -> 20, [2, 9] -> 18, [1] -> 1
    assert padded_tokens_in_order(np.array([3, 10, 2, 9, 1]), 2) == 39


def test_openvino_peers_share_one_venv_and_calibrate_on_the_exporters_texts(tmp_path):
    assert {"st-openvino", "st-openvino-f32", "st-openvino-qint8"} <= set(peers.PEERS) <= set(peers.VENV)
    assert {peers.VENV[p] for p in ("st-openvino", "st-openvino-f32", "st-openvino-qint8")} == {"openvino"}
    with pytest.raises(peers.PeerError, match="bash bench/install_peers.sh openvino"):
        peers.python_for("st-openvino-qint8", {}, tmp_path)
    # st-openvino pools in PyTorch, so it leaves an instruction out (T5 shapes); the static int8 export is
    # calibrated on plain texts and stays a plain-text peer
    assert peers.PRECISION["st-openvino-qint8"] == "int8" and "st-openvino-qint8" in peers.PLAIN_TEXT
    assert not {"st-openvino", "st-openvino-f32"} & peers.PLAIN_TEXT
    texts = peers.calibration_texts()
    assert len(texts) > 50 and all(isinstance(t, str) and t.strip() for t in texts)
    with pytest.raises(peers.PeerError, match="cannot leave the instruction"):
        peers.start("st-openvino-qint8", TINY, ["x"], DOC_INSTRUCTION, tmp_path, 1, 4, {})


def test_the_worker_answers_for_every_peer_the_bench_offers():
    spec = importlib.util.spec_from_file_location("peer_worker", peers.WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    assert set(worker.PEERS) == set(peers.PEERS)
