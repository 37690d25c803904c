"""Upstream train.py's command line, as its README writes it, runs here; its other flags are taken, noted or refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_trainer_resume import FIXTURES, ROOT, _env
from trainer import INSTRUCTOR
from trainer.__main__ import main as train_main
from trainer.config import parse_job

MEDI = FIXTURES / "medi" / "medi-tiny.json"
# The README line of xlang-ai/instructor-embedding, word for word but for its two {placeholders}.
README_LINE = (
    "--model_name_or_path sentence-transformers/gtr-t5-large --output_dir {output_directory} --cache_dir {cache_directory} "
    "--max_source_length 512 --num_train_epochs 10 --save_steps 500 --cl_temperature 0.1 --warmup_ratio 0.1 "
    "--learning_rate 2e-5 --overwrite_output_dir"
)


def _readme_argv(out: Path, cache: Path) -> list[str]:
    return README_LINE.format(output_directory=out, cache_directory=cache).split()


def _isolated_env(tmp_path: Path) -> dict[str, str]:
    """No default model cache of this machine is looked in: only --cache_dir."""
    return {**_env(), "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def cache(tmp_path) -> Path:
    """upstream's --cache_dir: medi-data.json, and the model where sentence-transformers 2.2.2 downloaded it."""
    folder = tmp_path / "cache"
    folder.mkdir()
    shutil.copyfile(MEDI, folder / "medi-data.json")
    shutil.copytree(FIXTURES / "instructor-tiny", folder / "sentence-transformers_gtr-t5-large")
    return folder


@pytest.mark.slow
def test_the_upstream_readme_line_trains(tmp_path, cache, golden_inputs):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trainer", *_readme_argv(out, cache)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_isolated_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 34 rows in 3 tasks of 14, 11 and 9 rows; the default batch of 8 (Hugging Face's) gives 3 steps an epoch
    assert "34 rows, 3 tasks; global batch 8 (1 x 8); 3 steps per epoch, 30 steps (3 of warmup)" in proc.stdout
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31)) and {r["epoch"] for r in log} == set(range(10))
    lrs = [r["lr"] for r in log]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(2e-5) and lrs.index(max(lrs)) == 3  # warmup, then linear decay
    assert not (out / "checkpoints").exists()  # --save_steps 500 > 30 steps
    trained, start = INSTRUCTOR(out, device="cpu"), INSTRUCTOR(cache / "sentence-transformers_gtr-t5-large", device="cpu")
    a, b = trained.encode(golden_inputs[:8]), start.encode(golden_inputs[:8])
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5) and np.abs(a - b).max() > 1e-4


@pytest.mark.slow
def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "trainer", "--model_name_or_path", str(FIXTURES / "instructor-tiny"), "--data", str(MEDI),
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "7", "--save_steps", "2",
        "--save_total_limit", "2", "--max_source_length", "48", "--fp16", "False", "--logging_steps", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_isolated_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert "note: --logging_steps has no effect here: every step is logged to OUTPUT_DIR/train_log.jsonl" in proc.stderr


def test_a_hub_name_not_on_disk_asks_for_a_local_folder(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    shutil.rmtree(cache / "sentence-transformers_gtr-t5-large")
    assert train_main(_readme_argv(tmp_path / "out", cache)) == 2
    err = capsys.readouterr().err
    assert "error: sentence-transformers/gtr-t5-large: no such folder, and no model hub is contacted here" in err
    assert str(cache / "sentence-transformers_gtr-t5-large") in err and "Pass a local folder" in err
    assert not (tmp_path / "out").exists()


def test_the_readme_line_parses_to_upstreams_values(tmp_path):
    job = parse_job(_readme_argv(tmp_path / "out", tmp_path / "cache"))
    assert job.model_name_or_path == "sentence-transformers/gtr-t5-large"
    assert job.data == job.cache_dir == str(tmp_path / "cache")
    assert (job.max_source_length, job.num_train_epochs, job.save_steps, job.cl_temperature) == (512, 10.0, 500, 0.1)
    assert (job.warmup_ratio, job.learning_rate, job.overwrite_output_dir) == (0.1, 2e-5, True)
    assert (job.per_device_train_batch_size, job.seed, job.max_grad_norm, job.weight_decay) == (8, 42, 1.0, 0.0)  # HF's defaults


def test_train_py_args_json_is_the_same_job(tmp_path):
    argv = _readme_argv(tmp_path / "out", tmp_path / "cache")
    values = {argv[i].removeprefix("--"): argv[i + 1] for i in range(0, len(argv) - 1, 2)}
    values["overwrite_output_dir"] = True
    values["report_to"] = ["none"]
    values["tokenizer_name"] = None
    (tmp_path / "args.json").write_text(json.dumps(values))
    assert parse_job([str(tmp_path / "args.json")]) == parse_job(argv)


def test_hugging_face_training_arguments(tmp_path, capsys):
    base = ["--model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), "--data", str(MEDI)]
    assert parse_job(base + ["--fp16"]).mixed_precision == "fp16"
    assert parse_job(base + ["--bf16", "True", "--fp16", "false"]).mixed_precision == "bf16"
    job = parse_job(base + ["--warmup_steps", "5", "--adam_epsilon", "1e-6", "--gradient_checkpointing", "--pad_to_max_length", "yes"])
    assert (job.warmup_steps_of(100), job.adam_epsilon, job.gradient_checkpointing, job.pad_to_max_length) == (5, 1e-6, True, True)
    assert parse_job(base).warmup_steps_of(25) == 3  # ceil(0.1 x 25), as Hugging Face's Trainer
    job = parse_job(base + ["--do_train", "--report_to", "wandb", "tensorboard", "--local_rank=0", "--optim", "adamw_hf"])
    assert job == parse_job(base)
    assert "note: --do_train has no effect here" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fp16", "--bf16"], "conflicting precisions: bf16, fp16"),
        (["--gradient_accumulation_steps", "4"], "--gradient_accumulation_steps 4: accumulation would give each micro-batch"),
        (["--do_eval"], "--do_eval True: no evaluation runs during training: score the saved model with `python -m bench.quality.mteb`"),
        (["--lr_scheduler_type", "cosine"], "the schedule is linear warmup then linear decay"),
        (["--max_train_samples", "100"], "train on a smaller data file"),
        (["--deepspeed", "ds.json"], "accelerate launch --multi_gpu"),
        (["--no_such_flag", "3"], "unrecognized arguments: --no_such_flag 3. These are not options of python -m trainer"),
        (["--overwrite_output_dir", "maybe"], "expected true or false, got 'maybe'"),
    ],
)
def test_what_cannot_run_here_is_refused_with_the_way(tmp_path, capsys, extra, message):
    base = ["--model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), "--data", str(MEDI)]
    with pytest.raises(SystemExit) as exc:
        parse_job(base + extra)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_data_or_cache_dir_is_needed(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_job(["--model_name_or_path", "m", "--output_dir", str(tmp_path / "o")])
    assert "give --data FILE_OR_FOLDER, or --cache_dir FOLDER holding medi-data.json" in capsys.readouterr().err
