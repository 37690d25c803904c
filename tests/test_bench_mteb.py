"""bench.mteb: small end-to-end evaluations through mteb's own evaluators, on shipped samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

pytest.importorskip("mteb")

from bench.mteb.__main__ import main  # noqa: E402
from bench.mteb.model import Instructions  # noqa: E402
from bench.mteb.offline import DataError, load_emotion, load_sts, offline_task  # noqa: E402
from mteb.types import PromptType  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "bench-data"
TINY = FIXTURES / "instructor-tiny"


def test_sts_end_to_end_matches_independent_spearman(tmp_path, tiny_model):
    out = tmp_path / "out"
    assert main(["--engine", str(TINY), "--tasks", "STSBenchmark", "--data-dir", str(DATA), "--output-dir", str(out)]) == 0
    result = json.loads((out / "STSBenchmark.json").read_text())
    score = result["scores"]["test"][0]["main_score"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["instructions_for"] == "hkunlp/instructor-large"  # T5 model: INSTRUCTOR table by default
    assert summary["results"][0]["score"] == pytest.approx(score, abs=1e-6)  # mteb rounds its JSON to 6 digits
    score = summary["results"][0]["score"]
    assert (out / "summary.md").read_text().count("STSBenchmark") == 1

    rows = [json.loads(line) for line in (DATA / "sts/STSBenchmark/test.jsonl").read_text().splitlines()]
    instruction = "represent the statement: "  # instructor-large's STSBenchmark entry, odd capitalisation kept
    a = tiny_model.encode([[instruction, r["sentence1"]] for r in rows])
    b = tiny_model.encode([[instruction, r["sentence2"]] for r in rows])
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    expected = spearmanr(cos, [r["score"] for r in rows]).statistic
    assert score == pytest.approx(expected, abs=1e-6)
    assert summary["results"][0]["instructions"] == {"text": instruction}


def test_instructions_none_encodes_plain_text(tmp_path, tiny_model):
    out = tmp_path / "out"
    args = ["--engine", str(TINY), "--tasks", "STSBenchmark", "--data-dir", str(DATA), "--output-dir", str(out), "--instructions-for", "none"]
    assert main(args) == 0
    score = json.loads((out / "STSBenchmark.json").read_text())["scores"]["test"][0]["main_score"]
    rows = [json.loads(line) for line in (DATA / "sts/STSBenchmark/test.jsonl").read_text().splitlines()]
    a = tiny_model.encode([r["sentence1"] for r in rows])
    b = tiny_model.encode([r["sentence2"] for r in rows])
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert score == pytest.approx(spearmanr(cos, [r["score"] for r in rows]).statistic, abs=1e-6)


def test_retrieval_uses_query_and_corpus_instructions(tmp_path):
    beir = tmp_path / "data" / "scifact"
    (beir / "qrels").mkdir(parents=True)
    docs = [("d1", "Aspirin", "Aspirin lowers fever."), ("d2", "", "Cats sleep a lot."), ("d3", "Rain", "Clouds bring rain.")]
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in docs))
    queries = [("q1", "What reduces fever?"), ("q2", "Why is it raining?"), ("q3", "unjudged query")]
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in queries))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t1\n")
    out = tmp_path / "out"
    assert main(["--engine", str(TINY), "--tasks", "SciFact", "--data-dir", str(tmp_path / "data"), "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    row = summary["results"][0]
    assert row["metric"] == "ndcg_at_10" and 0.0 < row["score"] <= 1.0
    assert row["instructions"] == {
        "query": "Represent a Scientific query for retrieving a supporting passage; ",
        "document": "represent the Scientific passage for retrieval; ",
    }
    task = offline_task("SciFact", tmp_path / "data")
    task.load_data()
    split = task.dataset["default"]["test"]
    assert split["queries"]["id"] == ["q1", "q2"]  # queries without judgements are dropped, as mteb does
    assert split["corpus"]["title"] == ["Aspirin", "", "Rain"]


def test_instruction_table_lookup():
    large = Instructions("hkunlp/instructor-large")
    assert large.lookup("Banking77Classification", None) == "Represent the bank purpose for classification: "
    assert large.lookup("ArguAna", PromptType.query) == "Represent a Debate argument for retrieving a counter-argument: "
    assert large.lookup("ArguAna", PromptType.document) == "Represent a Counter-argument: "
    assert not large.has("Banking77Clustering.derived")
    assert Instructions("none").lookup("STS12", None) is None
    with pytest.raises(ValueError, match="no instruction table"):
        Instructions("hkunlp/instructor-huge")


def test_loaders_name_file_and_line(tmp_path):
    (tmp_path / "test.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a"}\n')
    with pytest.raises(DataError, match=r"test\.jsonl:2: missing field\(s\) \['sentence2', 'score'\]"):
        load_sts(tmp_path, ["test"])
    (tmp_path / "test.txt").write_text("text;label_name\ni feel fine;joy\nno label here\n")
    with pytest.raises(DataError, match=r"test\.txt:3: expected 'text;label'"):
        load_emotion(tmp_path, ["test"])
    with pytest.raises(DataError, match="file not found"):
        load_sts(tmp_path / "missing", ["test"])


def test_emotion_keeps_semicolons_in_text(tmp_path):
    (tmp_path / "test.txt").write_text("text;label_name\nwell; i feel fine;joy\n")
    ds = load_emotion(tmp_path, ["test"])["test"]
    assert ds["text"] == ["well; i feel fine"] and ds["label"] == [1]
