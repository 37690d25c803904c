"""bench.quality.mteb: small end-to-end evaluations through mteb's own evaluators, on shipped samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

mteb = pytest.importorskip("mteb")

from bench.quality.mteb.__main__ import main  # noqa: E402
from bench.quality.mteb.categories import averages, categories, dataset_of  # noqa: E402
from bench.quality.mteb.model import Instructions, instruction_tables  # noqa: E402
from bench.quality.datafiles import DataError  # noqa: E402
from bench.quality.mteb.offline import load_tables, offline_task, read_table  # noqa: E402
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
    # the BEIR sample of the data layout: 3 documents, 3 queries (one unjudged), 2 judgements
    out = tmp_path / "out"
    assert main(["--engine", str(TINY), "--tasks", "SciFact", "--data-dir", str(DATA), "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    row = summary["results"][0]
    assert row["metric"] == "ndcg_at_10" and 0.0 < row["score"] <= 1.0
    assert row["instructions"] == {
        "query": "Represent a Scientific query for retrieving a supporting passage; ",
        "document": "represent the Scientific passage for retrieval; ",
    }
    task = offline_task("SciFact", DATA)
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
    (tmp_path / "test.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a"\n')
    with pytest.raises(DataError, match=r"test\.jsonl:2: not JSON"):
        read_table(tmp_path / "test.jsonl")
    (tmp_path / "test.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a"}\n')
    with pytest.raises(DataError, match=r"test\.jsonl: row 2: fields \['sentence1'\] differ"):
        read_table(tmp_path / "test.jsonl")
    (tmp_path / "test.txt").write_text("text;label_name\ni feel fine;joy\nno label here\n")
    with pytest.raises(DataError, match=r"test\.txt:3: expected 'text;label'"):
        read_table(tmp_path / "test.txt")


def test_text_label_lines_keep_semicolons_and_map_labels_in_sorted_order(tmp_path):
    (tmp_path / "train.txt").write_text("text;label_name\nwell; i feel fine;joy\nso angry;anger\n")
    (tmp_path / "test.txt").write_text("text;label_name\nhappy;joy\n")
    task = mteb.get_task("EmotionClassification")
    ds = load_tables(task, tmp_path, {"train": tmp_path / "train.txt", "test": tmp_path / "test.txt"})
    assert ds["train"]["text"] == ["well; i feel fine", "so angry"]
    assert ds["train"]["label"] == [1, 0] and ds["test"]["label"] == [1]  # anger=0, joy=1


STS_PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar.", 4.8),
    ("A woman is slicing onions.", "Someone is cutting an onion.", 4.2),
    ("A dog runs in the park.", "A cat sleeps on a sofa.", 0.4),
    ("Kids are swimming in a lake.", "Children swim in the water.", 4.0),
    ("The stock market fell today.", "A chef is cooking pasta.", 0.0),
    ("A plane is taking off.", "An airplane departs.", 4.5),
]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _score(out: Path, task: str) -> float:
    return json.loads((out / f"{task}.json").read_text())["scores"]["test"][0]["main_score"]


@pytest.mark.parametrize("task", ["STS14", "BIOSSES"])
def test_sts_task_outside_the_old_list_runs_from_its_folder(tmp_path, tiny_model, task):
    rows = [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in STS_PAIRS]
    _write_jsonl(tmp_path / "data" / "sts" / task / "test.jsonl", rows)
    out = tmp_path / "out"
    args = ["--engine", str(TINY), "--tasks", task, "--data-dir", str(tmp_path / "data"), "--output-dir", str(out), "--instructions-for", "none"]
    assert main(args) == 0
    a = tiny_model.encode([r["sentence1"] for r in rows])
    b = tiny_model.encode([r["sentence2"] for r in rows])
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert _score(out, task) == pytest.approx(spearmanr(cos, [r["score"] for r in rows]).statistic, abs=1e-6)


def test_multilingual_task_runs_the_subsets_present(tmp_path, capsys):
    _write_jsonl(tmp_path / "sts" / "STS17" / "en-en" / "test.jsonl", [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in STS_PAIRS])
    task = offline_task("STS17", tmp_path)
    assert task.hf_subsets == ["en-en"]
    assert "no files for subset(s)" in capsys.readouterr().err
    task.load_data()
    assert task.dataset["en-en"]["test"]["sentence1"][0] == STS_PAIRS[0][0]


def test_classification_from_jsonl_with_label_names(tmp_path):
    folder = tmp_path / "imdb"  # ImdbClassification without its type suffix
    train = [{"text": f"{w} movie number {i}", "label": lab} for i in range(6) for w, lab in (("great", "pos"), ("awful", "neg"))]
    _write_jsonl(folder / "train.jsonl", train)
    _write_jsonl(folder / "test.jsonl", [{"text": "great film", "label": "pos"}, {"text": "awful film", "label": "neg"}])
    out = tmp_path / "out"
    assert main(["--engine", str(TINY), "--tasks", "ImdbClassification", "--data-dir", str(tmp_path), "--output-dir", str(out)]) == 0
    assert 0.0 <= _score(out, "ImdbClassification") <= 1.0
    task = offline_task("ImdbClassification", tmp_path)
    task.load_data()
    assert task.dataset["test"]["label"] == [1, 0]  # sorted names: neg=0, pos=1


def test_pair_classification_runs_mtebs_own_transform(tmp_path):
    # SprintDuplicateQuestions' hub files name the columns sent1/sent2; its dataset_transform renames them
    rows = [{"sent1": a, "sent2": b, "labels": int(s > 2.5)} for a, b, s in STS_PAIRS]
    _write_jsonl(tmp_path / "pairclassification" / "SprintDuplicateQuestions" / "test.jsonl", rows)
    out = tmp_path / "out"
    assert main(["--engine", str(TINY), "--tasks", "SprintDuplicateQuestions", "--data-dir", str(tmp_path), "--output-dir", str(out)]) == 0
    assert 0.0 < _score(out, "SprintDuplicateQuestions") <= 1.0

    _write_jsonl(tmp_path / "pairclassification" / "SprintDuplicateQuestions" / "test.jsonl", [{"a": "x", "b": "y", "labels": 1}])
    task = offline_task("SprintDuplicateQuestions", tmp_path)
    with pytest.raises(DataError, match=r"dataset_transform failed on these files .*hub dataset"):
        task.load_data()


def test_reranking_from_query_positive_negative_rows(tmp_path):
    rows = [
        {"query": "how to install python", "positive": ["installing python on ubuntu"], "negative": ["cooking rice", "dog food"]},
        {"query": "wifi not working", "positive": ["wireless network problems"], "negative": ["best pizza in town"]},
        {"query": "no negatives", "positive": ["dropped as mteb does"], "negative": []},
    ]
    _write_jsonl(tmp_path / "askubuntudupquestions" / "test.jsonl", rows)
    task = offline_task("AskUbuntuDupQuestions", tmp_path)
    task.load_data()
    split = task.dataset["default"]["test"]
    assert split["queries"]["id"] == ["test_query0", "test_query1"]
    assert split["top_ranked"]["test_query0"] == ["apositive_test_query0_00000", "negative_test_query0_00000", "negative_test_query0_00001"]
    assert split["relevant_docs"]["test_query1"] == {"apositive_test_query1_00000": 1, "negative_test_query1_00000": 0}
    out = tmp_path / "out"
    assert main(["--engine", str(TINY), "--tasks", "AskUbuntuDupQuestions", "--data-dir", str(tmp_path), "--output-dir", str(out)]) == 0
    assert 0.0 < _score(out, "AskUbuntuDupQuestions") <= 1.0


def test_legacy_clustering_reads_one_text_per_line_as_one_set(tmp_path):
    rows = [{"sentences": f"{topic} text {i}", "labels": topic} for topic in ("sport", "cooking", "space") for i in range(4)]
    _write_jsonl(tmp_path / "clustering" / "TwentyNewsgroupsClustering" / "test.jsonl", rows)
    task = offline_task("TwentyNewsgroupsClustering", tmp_path)
    task.load_data()
    assert len(task.dataset["test"]) == 1 and len(task.dataset["test"][0]["sentences"]) == 12


def test_missing_files_name_task_folders_and_files(tmp_path):
    (tmp_path / "sts" / "STS15").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        offline_task("STS15", tmp_path)
    msg = str(err.value)
    assert "task STS15 (STS): no local files" in msg
    assert f"{tmp_path / 'sts' / 'STS15'} (missing test.jsonl)" in msg
    assert f"{tmp_path / 'sts15'} (no such folder)" in msg
    assert "sentence1, sentence2, score" in msg

    (tmp_path / "nfcorpus" / "qrels").mkdir(parents=True)
    (tmp_path / "nfcorpus" / "corpus.jsonl").write_text("")
    with pytest.raises(DataError, match=r"nfcorpus \(missing queries\.jsonl, qrels/test\.tsv\)"):
        offline_task("NFCorpus", tmp_path)
    with pytest.raises(DataError, match="not registered in mteb"):
        offline_task("NoSuchTask", tmp_path)
    assert main(["--engine", str(TINY), "--tasks", "STS15", "--data-dir", str(tmp_path)]) == 2


# -- --category: the paper's English MTEB by category ---------------------------------------------------------------


def _sts_rows() -> list[dict]:
    return [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in STS_PAIRS]


def test_category_runs_the_tasks_found_and_names_the_rest(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(DATA / "sts" / "STSBenchmark", data / "sts" / "STSBenchmark")
    _write_jsonl(data / "sts" / "STS12" / "test.jsonl", _sts_rows())
    for subset in ("en-en", "ko-ko"):  # upstream ran STS17's English pair only
        _write_jsonl(data / "sts" / "STS17" / subset / "test.jsonl", _sts_rows())
    out = tmp_path / "out"
    assert main(["--engine", str(TINY), "--category", "sts", "--data-dir", str(data), "--output-dir", str(out)]) == 0
    assert "note: --category sts: 3 of 10 tasks have files under" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert [r["task"] for r in summary["results"]] == ["STS12", "STS17", "STSBenchmark"]
    assert {r["category"] for r in summary["results"]} == {"sts"}
    assert [m["task"] for m in summary["not_run"]] == ["BIOSSES", "SICK-R", "STS13", "STS14", "STS15", "STS16", "STS22"]
    assert "task BIOSSES (STS): no local files. Looked in:" in summary["not_run"][0]["reason"]
    sts17 = json.loads((out / "STS17.json").read_text())  # mteb's own result format
    assert [s["hf_subset"] for s in sts17["scores"]["test"]] == ["en-en"]
    scores = [r["score"] for r in summary["results"]]
    assert summary["averages"] == {"sts": {"score": pytest.approx(sum(scores) / 3), "datasets_run": 3, "datasets": 10}}
    table = (out / "summary.md").read_text()
    assert "| sts | BIOSSES |  | not run: no files in the data folder |" in table
    assert "| sts | **average** (3 of 10 datasets) |" in table and table.count("| sts |") == 11


def test_category_all_and_a_bad_file_stops_only_its_task(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(DATA / "scifact", data / "scifact")
    _write_jsonl(data / "sts" / "STS12" / "test.jsonl", _sts_rows())
    _write_jsonl(data / "sts" / "STS13" / "test.jsonl", [{"sentence1": "a", "sentence2": "b"}])  # no score column
    out = tmp_path / "out"
    assert main(["--engine", str(TINY), "--category", "all", "--data-dir", str(data), "--output-dir", str(out)]) == 1
    assert "error: STS13:" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["category"], r["task"]) for r in summary["results"]] == [("retrieval", "SciFact"), ("sts", "STS12")]
    failed = [m for m in summary["not_run"] if m["failed"]]
    assert [m["task"] for m in failed] == ["STS13"] and "lacks column(s) ['score']" in failed[0]["reason"]
    assert len(summary["not_run"]) == 67 - 2  # every other of the 67 tasks (56 datasets, CQADupstack as 12 subforums)
    assert summary["averages"]["retrieval"]["datasets"] == 15 and summary["averages"]["retrieval"]["datasets_run"] == 1
    assert summary["averages"]["classification"] == {"score": None, "datasets_run": 0, "datasets": 12}
    assert "| sts | STS13 |  | failed: bad data files (see summary.json) |" in (out / "summary.md").read_text()


def test_category_average_counts_cqadupstack_once():
    rows = [{"task": "CQADupstackGisRetrieval", "score": 0.2}, {"task": "CQADupstackTexRetrieval", "score": 0.4}, {"task": "ArguAna", "score": 0.5}]
    assert averages(rows, "retrieval") == {"retrieval": {"score": pytest.approx(0.4), "datasets_run": 2, "datasets": 15}}


def test_category_lists_are_the_papers_and_every_task_has_its_instructions():
    cats = categories()
    assert sum(len({dataset_of(n) for n in names}) for names in cats.values()) == 56
    assert {k: len(v) for k, v in cats.items()} == {
        "retrieval": 26, "reranking": 4, "clustering": 11, "pair_classification": 3, "classification": 12, "sts": 10, "summarization": 1,
    }  # fmt: skip
    for table in instruction_tables():
        instructions = Instructions(table)
        assert all(instructions.has(n) for names in cats.values() for n in names), table
    registered = {t.metadata.name for t in mteb.get_tasks(tasks=[n for names in cats.values() for n in names])}
    assert registered == {n for names in cats.values() for n in names}


def test_upstream_evaluate_model_flags(tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(TINY, cache / "hkunlp_instructor-tiny")  # where InstructorEmbedding's stack downloaded it
    out = tmp_path / "out"
    argv = ["--model_name", "hkunlp/instructor-tiny", "--cache_dir", str(cache), "--task_name", "STSBenchmark",
            "--output_dir", str(out), "--batch_size", "8", "--prompt", "hkunlp/instructor-xl", "--data-dir", str(DATA)]  # fmt: skip
    assert main(argv) == 0 and 0 < abs(_score(out, "STSBenchmark")) <= 1
    assert json.loads((out / "summary.json").read_text())["instructions_for"] == "hkunlp/instructor-xl"
    with pytest.raises(SystemExit):
        main(argv + ["--result_file", "results"])
    assert "unrecognized arguments: --result_file results; see --help; docs/compatibility.md" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--engine", str(TINY), "--category", "sts"])
    assert "--category needs --data-dir DATA_DIR" in capsys.readouterr().err
