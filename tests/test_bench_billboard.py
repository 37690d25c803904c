"""bench.quality.billboard: upstream's scoring on a small slice made here, checked against a direct implementation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.quality.billboard.__main__ import main
from bench.quality.billboard.crosscheck import sentence_transformer, upstream_pearson
from bench.quality.billboard.data import read_task
from bench.quality.billboard.score import INSTRUCTIONS, max_ref_cosine
from bench.quality.datafiles import DataError

TINY = Path(__file__).parent / "fixtures" / "instructor-tiny"

SEGMENTS = [
    ("s1", ["A dog runs across a grassy field.", "A brown dog is running outside."]),
    ("s2", ["Two people ride an elephant.", "A group rides on the back of an elephant."]),
    ("s3", ["A plate of pasta with tomato sauce.", "Spaghetti served on a white plate."]),
    ("s4", ["A man surfs a large wave.", "A surfer riding a wave in the ocean."]),
]
HYPS = {  # three systems per segment, grouped by segment in the references' order, as upstream's files are
    "s1": ["A dog running in the grass.", "A cat on a sofa.", "An animal outdoors."],
    "s2": ["People riding an elephant.", "A red car parked on a street.", "Elephants and people."],
    "s3": ["A plate of spaghetti.", "A bowl of food.", "A man is skiing."],
    "s4": ["A surfer on a wave.", "A person in the water.", "A dog running."],
}
HUMAN = [4.5, 0.5, 2.5, 4.0, 0.0, 3.0, 4.5, 3.0, 0.0, 5.0, 2.5, 0.5]


def write_slice(folder: Path, task: str = "mscoco") -> Path:
    (folder / task).mkdir(parents=True)
    (folder / task / f"{task}_references.jsonl").write_text("".join(json.dumps({"seg_id": s, "set_id": i, "refs": r}) + "\n" for i, (s, r) in enumerate(SEGMENTS)))
    rows = [{"SYS": f"sys{k}", "seg_id": s, "hyp": h} for s, _ in SEGMENTS for k, h in enumerate(HYPS[s])]
    for row, score in zip(rows, HUMAN):
        row["human_score"] = score
    (folder / task / f"{task}_THumB-1.0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def run(tmp_path: Path, engine: Path, table: str, tasks: tuple[str, ...] = ("mscoco",)) -> dict:
    out = tmp_path / f"out-{table.replace('/', '_')}"
    args = ["--engine", str(engine), "--data-dir", str(tmp_path / "data"), "--tasks", *tasks, "--instructions-for", table, "--output-dir", str(out)]
    assert main(args) == 0
    return json.loads((out / "summary.json").read_text())


def test_tiny_checkpoint_and_engine_equal_upstream_formula_in_sentence_transformers(tmp_path, tiny_engine):
    data = write_slice(tmp_path / "data")
    st = sentence_transformer(TINY, instructed=False)
    expected = upstream_pearson(st, data / "mscoco" / "mscoco_references.jsonl", data / "mscoco" / "mscoco_THumB-1.0.jsonl", None)
    for engine in (TINY, tiny_engine):
        row = run(tmp_path, engine, "none")["mscoco"]
        assert row["pearson"] == pytest.approx(expected, abs=1e-6)
        assert row["n"] == 12 and row["segments"] == 4 and row["instruction"] is None


def test_minilm_with_instructions_equals_upstream_formula(tmp_path, minilm_dir):
    data = write_slice(tmp_path / "data")
    st = sentence_transformer(minilm_dir, instructed=True)
    instruction = "Represent the caption: "  # instructor-large's mscoco entry
    expected = upstream_pearson(st, data / "mscoco" / "mscoco_references.jsonl", data / "mscoco" / "mscoco_THumB-1.0.jsonl", instruction)
    row = run(tmp_path, minilm_dir, "hkunlp/instructor-large")["mscoco"]
    assert row["instruction"] == instruction
    assert row["pearson"] == pytest.approx(expected, abs=1e-6)
    assert (tmp_path / "out-hkunlp_instructor-large" / "summary.md").read_text().count("| mscoco |") == 1


def test_instruction_tables_are_upstreams():
    assert INSTRUCTIONS["hkunlp/instructor-large"] == {"mscoco": "Represent the caption: ", "cnndm": "Represent a comment: ", "mt": "Represent the statement: "}
    assert INSTRUCTIONS["hkunlp/instructor-base"]["mscoco"] == "Represent the image caption: "
    assert INSTRUCTIONS["hkunlp/instructor-xl"]["cnndm"] == "Represent a news comment: "
    assert INSTRUCTIONS["hkunlp/instructor-xl"]["mt"] == "Represent the translation statement; "


def test_max_over_own_segment_references_brute_force():
    rng = np.random.default_rng(0)
    counts = [1, 3, 2]  # uneven reference counts are fine here (upstream's reshape needs them equal)
    refs = [rng.standard_normal((c, 5)) for c in counts]
    refs = [r / np.linalg.norm(r, axis=1, keepdims=True) for r in refs]
    hyps = rng.standard_normal((7, 5))
    hyps /= np.linalg.norm(hyps, axis=1, keepdims=True)
    segment = np.array([2, 0, 1, 1, 2, 0, 1])
    got = max_ref_cosine(hyps, refs, segment)
    for i, seg in enumerate(segment):
        assert got[i] == pytest.approx(max(float(np.dot(hyps[i], r)) for r in refs[seg]), abs=1e-12)


def test_missing_task_is_reported_not_run_and_others_run(tmp_path, tiny_engine):
    write_slice(tmp_path / "data" / "billboard")  # DATA_DIR/billboard/mscoco works too
    summary = run(tmp_path, tiny_engine, "none", ("mscoco", "mt"))
    assert "pearson" in summary["mscoco"]
    assert summary["mt"]["status"] == "not run"
    assert "wmt20-zh-en_references.jsonl" in summary["mt"]["reason"] and "wmt20-zh-en_THumB-1.0.jsonl" in summary["mt"]["reason"]
    assert main(["--engine", str(tiny_engine), "--data-dir", str(tmp_path / "nothing"), "--tasks", "cnndm"]) == 2


def test_bad_rows_are_named(tmp_path):
    data = write_slice(tmp_path / "data")
    thumb = data / "mscoco" / "mscoco_THumB-1.0.jsonl"
    lines = thumb.read_text().splitlines()
    thumb.write_text("\n".join([*lines[:2], json.dumps({"seg_id": "s9", "hyp": "x", "human_score": 1.0}), *lines[3:]]) + "\n")
    with pytest.raises(DataError, match=r"mscoco_THumB-1\.0\.jsonl: row 3: seg_id 's9' has no references"):
        read_task(data, "mscoco")
    thumb.write_text("\n".join([*lines[:1], json.dumps({"seg_id": "s1", "hyp": "x"})]) + "\n")
    with pytest.raises(DataError, match=r"mscoco_THumB-1\.0\.jsonl:2: missing field\(s\) \['human_score'\]"):
        read_task(data, "mscoco")


def test_a_malformed_task_is_named_the_others_run_and_the_exit_is_1(tmp_path, tiny_engine, capsys):
    write_slice(tmp_path / "data")
    write_slice(tmp_path / "data", "cnndm")
    thumb = tmp_path / "data" / "cnndm" / "cnndm_THumB-1.0.jsonl"
    thumb.write_text(thumb.read_text().replace('"human_score": 4.5', '"human_score": "high"', 1))
    out = tmp_path / "out"
    args = ["--engine", str(tiny_engine), "--data-dir", str(tmp_path / "data"), "--instructions-for", "none",
            "--output-dir", str(out)]
    assert main([*args, "--tasks", "mscoco", "cnndm"]) == 1  # bad input data, named; mscoco still scored
    err = capsys.readouterr().err
    assert f"error: cnndm not run: {thumb}: row 1: human_score must be a number" in err
    summary = json.loads((out / "summary.json").read_text())
    assert "pearson" in summary["mscoco"] and summary["cnndm"]["status"] == "not run"
    assert main([*args, "--tasks", "cnndm"]) == 1
    assert "no Billboard task has readable files" in capsys.readouterr().err


def test_billboard_help_states_the_exit_codes_and_refuses_abbreviations(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "exit codes: 0 done; 1 bad input data" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exc:
        main(["--engine", "e.onnx", "--data-dir", "d", "--task", "mscoco"])  # --task is not --tasks
    assert exc.value.code == 2 and "unrecognized arguments: --task" in capsys.readouterr().err
