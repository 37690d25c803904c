"""Training data safety: no model overwritten, no code run from a checkpoint, no bad row that passes validation."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

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
    assert proc.returncode == 1  # bad input data: the checkpoint
    assert "unexpected files ['custom_checkpoint_0.pkl']" in proc.stderr
    assert not marker.exists()


def test_a_crafted_optimizer_state_is_refused_and_not_run(checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, folder)
    marker = tmp_path / "marker"
    torch.save({"state": Payload(marker)}, folder / "optimizer.pt")
    proc = _resume(folder, tmp_path)
    assert proc.returncode == 1
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
    assert train_main(_args(tmp_path / "out", "--data", str(tmp_path / "d.jsonl"))) == 1
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


def test_the_trainer_cli_exits_1_on_bad_data_with_a_message(tmp_path, capsys):
    """Bad input data exits 1 (the contract of every command), naming file, line and field."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD).replace('"x"', '"\\udfff"') + "\n", encoding="utf-8")
    assert train_main(_args(tmp_path / "out", "--data", str(path))) == 1
    err = capsys.readouterr().err
    assert "line 2: field 'query' element 1: invalid unicode" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out" / "checkpoints")


# -- 7. a diverged run stops, names the step and never saves NaN weights ------------------------------------------


def _run(out: Path, *extra: str, steps: int = 4, save: int = 2) -> list[str]:
    argv = _args(out, *extra)
    argv[argv.index("--max_steps") + 1], argv[argv.index("--save_steps") + 1] = str(steps), str(save)
    return argv


def _at_step(monkeypatch, step: int, poison) -> None:
    """Run the real training step, then ``poison(model, loss)`` (its return value is the loss) at the ``step``-th call."""
    import trainer.loop as loop

    real, calls = loop.contrastive_step, []

    def patched(model, *args, **kwargs):
        loss = real(model, *args, **kwargs)
        calls.append(loss)
        return poison(model, loss) if len(calls) == step else loss

    monkeypatch.setattr(loop, "contrastive_step", patched)


def _nan_loss(model, loss):
    return float("nan")


def _inf_gradient(model, loss):
    next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("inf"))
    return loss


def _nan_weight(model, loss):
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))  # as an optimizer step that overflowed would leave it
    return loss


def _steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_a_nan_loss_stops_at_its_step_keeps_the_checkpoint_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    assert train_main(_run(tmp_path / "full")) == 0
    _at_step(monkeypatch, 3, _nan_loss)
    out = tmp_path / "stopped"
    assert train_main(_run(out)) == 2
    err = capsys.readouterr().err
    assert "error: step 3: the loss is NaN or infinite (learning rate" in err and "no trained model was saved" in err
    assert f"the newest checkpoint (its weights are finite) is {out / 'checkpoints' / 'checkpoint-2'}" in err
    assert "Traceback" not in err
    assert not (out / "modules.json").exists() and not (out / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert _steps_logged(out) == [1, 2]  # the failing step is not logged as trained

    monkeypatch.undo()
    assert train_main(_run(out, "--resume_from_checkpoint", "latest")) == 0
    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)  # step 3 was never applied: same weights as no NaN at all
    assert _steps_logged(out) == [1, 2, 3, 4]


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_an_infinite_gradient_stops_before_the_optimizer_step(tmp_path, capsys, monkeypatch, clip):
    _at_step(monkeypatch, 2, _inf_gradient)
    out = tmp_path / "out"
    assert train_main(_run(out, "--max_grad_norm", clip)) == 2
    assert "error: step 2: the gradient norm is NaN or infinite" in capsys.readouterr().err
    assert not (out / "checkpoints").exists() and not (out / "modules.json").exists()


@pytest.mark.parametrize("step, saved", [(2, "checkpoint-2"), (4, "the trained model")])
def test_nan_weights_are_never_saved(tmp_path, capsys, monkeypatch, step, saved):
    """A weight made NaN by the last step before a save: neither that checkpoint nor the final model is written."""
    _at_step(monkeypatch, step, _nan_weight)
    out = tmp_path / "out"
    assert train_main(_run(out, steps=4, save=2)) == 2
    err = capsys.readouterr().err
    assert f"error: step {step}: a weight is NaN or infinite" in err and "its weights were not saved" in err
    assert not (out / "modules.json").exists() and not (out / "model.safetensors").exists()
    kept = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []
    assert kept == ([] if step == 2 else ["checkpoint-2"]), saved
    for folder in kept:
        assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoints" / folder / "model.safetensors").values())


@pytest.mark.slow
def test_learning_rate_1e9_stops_with_the_step_and_keeps_the_finite_checkpoint(tmp_path):
    """The issue's case as a user runs it: lr 1e9 made every weight NaN and the run exited 0, 'saved the trained model'."""
    out = tmp_path / "out"
    cmd = _cmd(out, "--learning_rate", "1e9")
    cmd[cmd.index("--max_steps") + 1], cmd[cmd.index("--save_steps") + 1] = "6", "2"
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "training diverged and stopped" in line[0], proc.stderr[-3000:]
    assert "saved the trained model" not in proc.stdout and not (out / "modules.json").exists()
    step = int(line[0].split("step ")[1].split(":")[0])
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept and all(int(k.split("-")[1]) < step for k in kept)
    for k in kept:
        assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoints" / k / "model.safetensors").values())


def test_the_divergence_flag_is_reduced_over_processes(tmp_path):
    """Rank 1 alone sees a NaN loss: both ranks get the same answer, so both stop at the same step."""
    import torch.multiprocessing as mp

    from tests.test_trainer_dist import _free_port

    mp.spawn(_flag_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [["the loss"], ["the loss"]]


def _flag_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from trainer.divergence import nonfinite_anywhere

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    values = {"the loss": float("nan") if rank == 1 else 1.5, "the gradient norm": torch.tensor(2.0)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(nonfinite_anywhere(values, "cpu")))
    dist.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_a_nan_on_one_process_stops_every_process(tmp_path):
    """2 CPU processes (gloo); rank 1's loss alone is NaN at step 2: both stop at step 2 with exit 2, none hangs.

    The processes are started with torchrun's environment but without its agent, which would kill the second
    process as soon as the first exits: each one's own exit code and message are what is checked.
    """
    import sys

    from tests.test_trainer_dist import _free_port

    out = tmp_path / "out"
    argv = _run(out, "--per_device_train_batch_size", "2", steps=4, save=1)
    cmd = [sys.executable, "-m", "tests.trainer_hooked", "nan-loss@1:2", *argv]
    port = str(_free_port())
    ranks = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
            **_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(r),
            "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
        })
        for r in range(2)
    ]  # fmt: skip
    results = [p.communicate(timeout=240) for p in ranks]
    for rank, (proc, (_, err)) in enumerate(zip(ranks, results)):
        errors = [x for x in err.splitlines() if x.startswith("error: ")]
        assert proc.returncode == 2, f"rank {rank}:\n{err[-3000:]}"
        assert len(errors) == 1 and "step 2: the loss is NaN or infinite on at least one process" in errors[0], err[-3000:]
        assert "Traceback" not in err
    assert not (out / "modules.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]


# -- 8. a damaged checkpoint is one line naming the file (exit 1), never a traceback -------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_model(path: Path) -> None:
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(path).items()}, path)


@pytest.mark.parametrize("name, damage, message", [
    ("model.safetensors", _truncate, "damaged or not written by this trainer"),
    ("model.safetensors", _nan_model, "holds NaN or infinite weights"),
    ("train_state.json", lambda p: p.write_text('{"step": 2, "settings"'), "damaged or not written by this trainer"),
    ("train_state.json", lambda p: p.write_text("[]"), "damaged: expected an object with 'step' and 'settings'"),
    ("train_state.json", lambda p: p.write_text(p.read_text().replace('"step": 2', '"step": "two"')), "field 'step' must be an integer"),
    ("scheduler.json", _truncate, "damaged or not written by this trainer"),
    ("scheduler.json", lambda p: p.write_text('{"base_lrs": "x"}'), "not the state of this trainer's learning-rate schedule"),
    ("optimizer.pt", _truncate, "refused by torch.load(weights_only=True)"),
    ("rng-0.json", lambda p: p.write_text('{"python": 1}'), "damaged or not written by this trainer"),
    ("rng-0.safetensors", _truncate, "damaged or not written by this trainer"),
])  # fmt: skip
def test_a_damaged_checkpoint_file_is_named_in_one_line(checkpoint, tmp_path, capsys, name, damage, message):
    import shutil

    folder = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, folder)
    damage(folder / name)
    assert train_main(_run(tmp_path / "resumed", "--resume_from_checkpoint", str(folder))) == 1
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert errors == [x for x in errors if x.startswith(f"error: {folder / name}: ")] and len(errors) == 1, err
    assert message in errors[0] and "Traceback" not in err
    assert not (tmp_path / "resumed" / "modules.json").exists()


def test_resuming_with_other_settings_is_a_usage_error(checkpoint, tmp_path, capsys):
    assert train_main(_run(tmp_path / "resumed", "--resume_from_checkpoint", str(checkpoint), "--seed", "7")) == 2
    assert "the checkpoint was made with other settings (saved, now): {'seed': (42, 7)}" in capsys.readouterr().err


def test_a_new_learning_rate_applies_on_resume(checkpoint, tmp_path, capsys):
    """After a divergence the way on is the checkpoint with a lower rate: the saved schedule's peak is replaced."""
    out = tmp_path / "resumed"
    assert train_main(_run(out, "--resume_from_checkpoint", str(checkpoint), "--learning_rate", "1e-3")) == 0
    assert "note: --learning_rate 0.001 replaces the checkpoint's 2e-05 from step 3 on" in capsys.readouterr().err
    lrs = [json.loads(line)["lr"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    # 4 steps, 1 of warmup: lr(step s) = peak x (4 - (s - 1)) / 3 after it; steps 3 and 4 run at the new peak's schedule
    assert lrs == pytest.approx([1e-3 * 2 / 3, 1e-3 * 1 / 3])


# -- 9. the output folder, the data index cache and the log are never a traceback --------------------------------


def test_an_output_dir_that_is_a_file_is_named_as_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert train_main(_args(tmp_path / "f")) == 2
    assert f"error: {tmp_path / 'f'}: --output_dir is a file, not a folder" in capsys.readouterr().err
    assert train_main(_args(tmp_path / "f" / "out")) == 2
    err = capsys.readouterr().err
    assert f"--output_dir is under {tmp_path / 'f'}, which is a file, not a folder" in err and "resume" not in err
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("damage", ["truncated", "arrays"])
def test_a_damaged_data_index_cache_is_rebuilt(tmp_path, damage):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({**GOOD, "task_name": t}) + "\n" for t in "aab"), encoding="utf-8")
    cache = tmp_path / "data-index.npz"
    MediIndex.build(data, show_progress=False).save(cache)
    assert MediIndex.load(cache, data) is not None
    if damage == "truncated":
        _truncate(cache)
    else:  # the right metadata over arrays that point outside the file
        import numpy as np

        with np.load(cache) as z:
            arrays = dict(z)
        arrays["offsets"] = arrays["offsets"] + 10**9
        np.savez(cache, **arrays)
    assert MediIndex.load(cache, data) is None


def test_a_log_line_torn_by_a_kill_does_not_stop_a_resume(tmp_path):
    from trainer.metrics import StepLog

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    StepLog(log, resume_step=2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_a_resume_without_learning_rate_keeps_the_checkpoints(tmp_path, capsys):
    """Only a --learning_rate given on resume replaces the checkpoint's: a plain resume of a 1e-3 run stays bit-exact."""
    first = tmp_path / "first"
    assert train_main(_run(first, "--learning_rate", "1e-3")) == 0
    out = tmp_path / "resumed"
    assert train_main(_run(out, "--resume_from_checkpoint", str(first / "checkpoints" / "checkpoint-2"))) == 0
    assert "replaces the checkpoint's" not in capsys.readouterr().err
    lrs = [[json.loads(line)["lr"] for line in (d / "train_log.jsonl").read_text().splitlines()] for d in (first, out)]
    assert lrs[1] == lrs[0][2:] == pytest.approx([1e-3 * 2 / 3, 1e-3 * 1 / 3])
    a, b = load_file(first / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
