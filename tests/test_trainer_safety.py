"""Training data safety: no model overwritten, no code run from a checkpoint, no bad row that passes validation."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from trainer.__main__ import main as train_main
from trainer.data import DataError, MediIndex, RowReader
from tests.test_trainer_resume import FIXTURES, ROOT, _cmd, _env

GOOD = {"query": ["Represent a: ", "x"], "pos": ["Represent b: ", "y"], "neg": ["Represent b: ", "z"], "task_name": "t"}


def _args(out: Path, *extra: str) -> list[str]:
    return _cmd(out, *extra)[3:]  # without "python -m trainer"


# -- 4. models are never overwritten -------------------------------------------------------------------------------


def test_an_output_holding_a_model_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "trained"
    out.mkdir()
    (out / "modules.json").write_text("[]")
    (out / "model.safetensors").write_bytes(b"weights of an earlier run")
    assert train_main(_args(out)) == 2
    err = capsys.readouterr().err
    assert "already holds a model (modules.json, model.safetensors)" in err and "--overwrite_output_dir" in err
    assert (out / "model.safetensors").read_bytes() == b"weights of an earlier run"


def test_the_source_model_is_never_the_output(tmp_path, capsys):
    src = tmp_path / "src"
    import shutil

    shutil.copytree(FIXTURES / "instructor-tiny", src)
    before = sorted(p.name for p in src.iterdir())
    for extra in ([], ["--overwrite_output_dir"]):
        argv = _args(src, *extra)
        argv[argv.index("--model_name_or_path") + 1] = str(src / ".." / "src")
        assert train_main(argv) == 2
        assert "--output_dir is the model being trained from" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == before


# -- 5. no code from checkpoints ------------------------------------------------------------------------------------


class Payload:
    """Unpickling this writes a marker file: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    cmd = _cmd(out)
    cmd[cmd.index("--max_steps") + 1] = "4"
    cmd[cmd.index("--save_steps") + 1] = "2"
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = out / "checkpoints" / "checkpoint-2"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["model.safetensors", "optimizer.pt", "rng-0.json", "rng-0.safetensors", "scheduler.json", "train_state.json"]
    return folder


def _resume(folder: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = _cmd(tmp_path / "resumed", "--resume_from_checkpoint", str(folder))
    cmd[cmd.index("--max_steps") + 1] = "4"
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def test_a_planted_pickle_is_refused_and_not_run(checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, folder)
    marker = tmp_path / "marker"
    (folder / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    proc = _resume(folder, tmp_path)
    assert proc.returncode == 2
    assert "unexpected files ['custom_checkpoint_0.pkl']" in proc.stderr
    assert not marker.exists()


def test_a_crafted_optimizer_state_is_refused_and_not_run(checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, folder)
    marker = tmp_path / "marker"
    torch.save({"state": Payload(marker)}, folder / "optimizer.pt")
    proc = _resume(folder, tmp_path)
    assert proc.returncode == 2
    assert "optimizer.pt: refused by torch.load(weights_only=True)" in proc.stderr
    assert not marker.exists()


def test_a_clean_checkpoint_resumes(checkpoint, tmp_path):
    proc = _resume(checkpoint, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 2" in proc.stdout


# -- 6. rows the training step cannot take are refused before step 1 ---------------------------------------------


@pytest.mark.parametrize("line,message", [
    (json.dumps(GOOD).replace('"y"', '"\\ud800"'), "line 2: field 'pos' element 1: invalid unicode (lone surrogate)"),
    ('{"query": ' + "[" * 100_000 + "]" * 100_000 + "}", "line 2: JSON nested too deeply"),
    (json.dumps(GOOD)[:-1] + ', "n": ' + "9" * 5000 + "}", "line 2: unreadable JSON value (Exceeds the limit"),
])
def test_unusable_rows_fail_validation_by_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MediIndex.build(path, show_progress=False)


def test_unusable_rows_fail_validation_in_a_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[" + json.dumps(GOOD) + ", " + json.dumps(GOOD).replace('"z"', '"\\udc00"') + "]", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1: field 'neg' element 1: invalid unicode"):
        MediIndex.build(path, show_progress=False)
    deep = tmp_path / "deep.json"
    deep.write_text("[" + json.dumps(GOOD) + ", " + "[" * 100_000 + "]" * 100_000 + "]", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 1: JSON nested too deeply"):
        MediIndex.build(deep, show_progress=False)


def test_invalid_utf8_is_named_not_a_traceback(tmp_path, capsys):
    for name, content in (("d.jsonl", json.dumps(GOOD).encode() + b"\n" + b'{"query": "caf\xe9"}\n'),
                          ("d.json", b"[" + json.dumps(GOOD).encode() + b', {"query": "caf\xe9"}]')):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match="not valid UTF-8"):
            MediIndex.build(path, show_progress=False)
    assert train_main(_args(tmp_path / "out", "--data", str(tmp_path / "d.jsonl"))) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["d.json", "d.jsonl"])
def test_a_byte_order_mark_is_read_past(tmp_path, name):
    rows = [GOOD, {**GOOD, "pos": ["Represent b: ", "ünïcode"]}]
    body = json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    index = MediIndex.build(path, show_progress=False)
    reader = RowReader(index)
    try:
        assert [reader[i] for i in range(len(index))] == rows  # offsets past the BOM are right
    finally:
        reader.close()


def test_the_trainer_cli_exits_2_on_bad_data_with_a_message(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD).replace('"x"', '"\\udfff"') + "\n", encoding="utf-8")
    assert train_main(_args(tmp_path / "out", "--data", str(path))) == 2
    err = capsys.readouterr().err
    assert "line 2: field 'query' element 1: invalid unicode" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out" / "checkpoints")
