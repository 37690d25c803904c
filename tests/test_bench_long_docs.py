"""``bench.quality.long_docs`` end to end on a small BEIR folder made here, and its search helpers against brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mteb")

from bench.quality import long_docs  # noqa: E402


def test_hamming_and_top_k_equal_brute_force():
    rng = np.random.default_rng(0)
    q, d = rng.integers(0, 256, (5, 6), dtype=np.uint8), rng.integers(0, 256, (40, 6), dtype=np.uint8)
    brute = -np.array([[bin(int.from_bytes((a ^ b).tobytes(), "big")).count("1") for b in d] for a in q])
    np.testing.assert_array_equal(long_docs.hamming_scores(q, d), brute)
    scores = rng.standard_normal((5, 40))
    np.testing.assert_array_equal(long_docs.top_k(scores, 7), np.argsort(-scores, axis=1)[:, :7])


def test_runs_on_a_small_beir_folder(tiny_engine, tmp_path):
    folder = tmp_path / "data" / "scifact"
    (folder / "qrels").mkdir(parents=True)
    words = "cells protein gene virus climate ocean model energy brain sleep".split()
    docs = [{"_id": f"d{i}", "title": words[i % 10], "text": " ".join(words[(i + k) % 10] for k in range(20 + 30 * (i % 4)))}
            for i in range(30)]
    queries = [{"_id": f"q{i}", "text": f"{words[i]} {words[(i + 1) % 10]}"} for i in range(6)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(6)))
    out = tmp_path / "long.json"
    assert long_docs.main(["--engine", str(tiny_engine), "--data-dir", str(tmp_path / "data"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"truncate", "chunk"}
    for info in report["modes"].values():
        assert set(info["variants"]) == {"float32", "int8", "binary", "binary+rescore"}
        assert all(0.0 <= v["ndcg_at_10"] <= 1.0 for v in info["variants"].values())
        assert info["variants"]["binary"]["bytes_per_vector"] == 4  # 32 dims
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG" and "| truncate | float32 |" in out.with_suffix(".md").read_text()
