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


# -- where the data comes from: the hub, checked first, or DATA_DIR written by bench.quality.fetch_data ---------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # a port just released: nothing listens there, a connection is refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_hub(monkeypatch) -> str:
    """The hub's address pointed at a closed local port: unreachable without any network."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    return endpoint


def test_without_data_dir_and_no_hub_it_stops_at_once_saying_what_to_pass(no_hub):
    """Was a ConnectionError traceback after 54 s (issue 32): now exit 3 before mteb or any model is loaded."""
    import subprocess
    import sys

    code = ("import sys\nfrom bench.quality.mteb.__main__ import main\n"
            f"rc = main(['--engine', {str(TINY)!r}, '--tasks', 'STSBenchmark'])\n"
            "assert 'mteb' not in sys.modules and 'torch' not in sys.modules, 'loaded before the check'\n"
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"error: --tasks without --data-dir needs the Hugging Face hub, and {no_hub} cannot be reached")
    assert "pass --data-dir DATA_DIR" in line and "docs/evaluation.md" in line and "python -m bench.quality.fetch_data" in line


def test_the_hub_probe_asks_once_and_takes_any_answer(no_hub, monkeypatch):
    import http.server
    import threading

    from bench.quality.hub import unreachable_reason

    assert "refused" in unreachable_reason().lower()

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - http.server's name
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert unreachable_reason() is None  # an HTTP error is an answer: the hub is there
    finally:
        server.shutdown()
        server.server_close()


def test_a_dataset_that_cannot_be_loaded_is_3_before_the_model(monkeypatch, capsys):
    """Offline mode (HF_HUB_OFFLINE) skips the probe; a dataset missing from the cache is one line, exit 3."""
    from bench.quality.mteb import __main__ as cli_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def not_cached(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'mteb/stsbenchmark-sts' on the Hub (LocalEntryNotFoundError)")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data")

    monkeypatch.setattr("mteb.abstasks.abstask.load_dataset", not_cached)
    monkeypatch.setattr(cli_main, "load_encoder", no_model)
    assert main(["--engine", str(TINY), "--tasks", "STSBenchmark"]) == 3
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: STSBenchmark: mteb/stsbenchmark-sts could not be loaded from the hub (Couldn't reach")
    assert "pass --data-dir DATA_DIR" in line


class FakeHub:
    """Hub datasets held in memory, served through the functions mteb loads with (no network)."""

    def __init__(self, repos: dict[str, dict[str, dict[str, list[dict]]]]) -> None:
        from datasets import Dataset, DatasetDict

        self.repos = {path: {config: DatasetDict({split: Dataset.from_list(rows) for split, rows in splits.items()})
                             for config, splits in configs.items()} for path, configs in repos.items()}
        self.calls: list[tuple[str, str | None]] = []

    def load_dataset(self, path, name=None, split=None, revision=None, **kwargs):
        self.calls.append((path, name))
        data = self.repos[path][name or "default"]
        return data[split] if split else data

    def config_names(self, path, revision=None, **kwargs):
        return list(self.repos[path])

    def split_names(self, path, revision=None, config_name=None, **kwargs):
        return list(self.repos[path][config_name or "default"])

    def install(self, monkeypatch) -> None:
        loaders = "mteb.abstasks.retrieval_dataset_loaders"
        monkeypatch.setattr("mteb.abstasks.abstask.load_dataset", self.load_dataset)
        monkeypatch.setattr(f"{loaders}.load_dataset", self.load_dataset)
        monkeypatch.setattr(f"{loaders}.get_dataset_config_names", self.config_names)
        monkeypatch.setattr(f"{loaders}.get_dataset_split_names", self.split_names)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the probe is skipped, and a real download would fail


def _fake_hub() -> FakeHub:
    sts = [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in STS_PAIRS]
    intents = [{"text": f"{word} question {i}", "label": k, "label_text": word}
               for k, word in enumerate(["card", "transfer", "refund"]) for i in range(4)]
    corpus = [{"_id": f"d{i}", "title": ["", "Yams"][i % 2], "text": f"document {i} about topic {i % 3}"} for i in range(6)]
    queries = [{"_id": f"q{i}", "text": f"question on topic {i}"} for i in range(4)]
    qrels = [{"query-id": f"q{i}", "corpus-id": f"d{i + 1}", "score": 1} for i in range(3)]  # q3 unjudged: dropped
    pairs = [{"sent1": [a for a, _, _ in STS_PAIRS], "sent2": [b for _, b, _ in STS_PAIRS],
              "labels": [int(s > 2.5) for _, _, s in STS_PAIRS]}]
    multi = [{**row, "lang": lang} for lang in ("en-en", "ko-ko") for row in sts]
    return FakeHub({
        "mteb/stsbenchmark-sts": {"default": {"train": sts[:2], "validation": sts[2:4], "test": sts}},
        "mteb/banking77": {"default": {"train": intents, "test": intents[::2]}},
        "mteb/scifact": {"corpus": {"corpus": corpus}, "queries": {"queries": queries}, "default": {"test": qrels}},
        "mteb/sprintduplicatequestions-pairclassification": {"default": {"test": pairs}},
        "mteb/sts17-crosslingual-sts": {"default": {"test": multi}},
    })


def _comparable(task) -> dict:
    """A loaded task's data as plain values, the splits its evaluation reads (retrieval: ids, titles and texts;
    judgements; top-ranked lists)."""
    from bench.quality.mteb.offline import task_splits

    def search(split):
        return {"corpus": sorted((d["id"], d.get("title") or "", d["text"]) for d in split["corpus"]),
                "queries": sorted((q["id"], q["text"]) for q in split["queries"]),
                "qrels": split["relevant_docs"], "top_ranked": split["top_ranked"] or None}

    data = task.dataset if task.metadata.is_multilingual or task.metadata.type == "Retrieval" else {"default": task.dataset}
    return {subset: {split: search(d) if task.metadata.type == "Retrieval" else d.to_list()
                     for split, d in splits.items() if split in task_splits(task)}
            for subset, splits in data.items()}


def test_fetch_data_writes_what_the_evaluation_reads_as_if_from_the_hub(tmp_path, monkeypatch, capsys):
    from bench.quality import fetch_data
    from bench.quality.mteb.offline import restrict_to_upstream

    hub = _fake_hub()
    hub.install(monkeypatch)
    names = ["STSBenchmark", "Banking77Classification", "SciFact", "SprintDuplicateQuestions"]
    assert fetch_data.main([str(tmp_path), "--tasks", *names]) == 0
    assert fetch_data.main([str(tmp_path), "--tasks", "STS17", "--upstream"]) == 0
    out = capsys.readouterr()
    assert f"--data-dir {tmp_path} --tasks STS17" in out.out and f"sts/STS17/en-en/test.jsonl: {len(STS_PAIRS)} rows" in out.err
    assert (tmp_path / "sts" / "STSBenchmark" / "test.jsonl").is_file()
    assert not (tmp_path / "sts" / "STSBenchmark" / "train.jsonl").exists()  # only the splits the evaluation reads
    assert sorted(p.name for p in (tmp_path / "retrieval" / "SciFact").iterdir()) == ["SOURCE.txt", "corpus.jsonl", "qrels", "queries.jsonl"]
    assert "revision: d56462d0e63a25450459c4f213e49ffdb866f7f9" in (tmp_path / "retrieval" / "SciFact" / "SOURCE.txt").read_text()
    assert not (tmp_path / "sts" / "STS17" / "ko-ko").exists()  # --upstream: the English subset only
    for name, upstream in [(n, False) for n in names] + [("STS17", True)]:
        local = offline_task(name, tmp_path, upstream_setup=upstream)
        local.load_data()
        from_hub = restrict_to_upstream(mteb.get_task(name)) if upstream else mteb.get_task(name)
        from_hub.load_data()  # mteb's own loading and transform, on the same fake hub
        assert _comparable(local) == _comparable(from_hub), name
    assert fetch_data.main([str(tmp_path), "--tasks", "STSBenchmark"]) == 2  # a folder in the way
    assert "STSBenchmark exists; pass --overwrite" in capsys.readouterr().err
    assert fetch_data.main([str(tmp_path), "--tasks", "STSBenchmark", "--overwrite"]) == 0


def test_fetch_data_checks_every_name_before_downloading(tmp_path, monkeypatch, capsys):
    from bench.quality import fetch_data

    hub = _fake_hub()
    hub.install(monkeypatch)
    assert fetch_data.main([str(tmp_path), "--tasks", "STSBenchmark", "NoSuchTask"]) == 2
    assert "task 'NoSuchTask' is not registered in mteb" in capsys.readouterr().err
    assert fetch_data.main([str(tmp_path), "--tasks", "STSBenchmark", "BUCC"]) == 2
    assert "task BUCC: type BitextMining has no local layout" in capsys.readouterr().err
    assert hub.calls == [] and not (tmp_path / "sts").exists()  # nothing downloaded, nothing written


def test_fetch_data_without_the_hub_is_3(tmp_path, no_hub, capsys):
    from bench.quality import fetch_data

    assert fetch_data.main([str(tmp_path / "data"), "--tasks", "STSBenchmark"]) == 3
    [line] = capsys.readouterr().err.splitlines()
    assert f"{no_hub} cannot be reached" in line and "run this where the hub is reachable" in line
    assert not (tmp_path / "data").exists()


def test_a_malformed_local_file_is_1_and_a_missing_one_2(tmp_path, capsys):
    folder = tmp_path / "sts" / "STSBenchmark"
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 1.0}\n{"sentence1": \n')
    assert main(["--engine", str(TINY), "--tasks", "STSBenchmark", "--data-dir", str(tmp_path)]) == 1
    assert f"error: {folder / 'test.jsonl'}:2: not JSON" in capsys.readouterr().err
    assert main(["--engine", str(TINY), "--tasks", "STS12", "--data-dir", str(tmp_path)]) == 2
    assert "task STS12 (STS): no local files" in capsys.readouterr().err
