"""``python -m trainer``'s command line: a readable --help, no abbreviations, the exit-code contract, start-up
progress; ``trainer.INSTRUCTOR``'s clear errors for a missing device and an engine file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_trainer_resume import FIXTURES, ROOT
from trainer.__main__ import main as train_main
from trainer.config import build_parser, parse_job
from trainer.upstream_args import FLAGS

MEDI = FIXTURES / "medi" / "medi-tiny.json"
TINY = FIXTURES / "instructor-tiny"


def _base(tmp_path: Path) -> list[str]:
    return ["--model_name_or_path", str(TINY), "--output_dir", str(tmp_path / "o"), "--data", str(MEDI)]


# -- abbreviations are refused -------------------------------------------------------------------------------------


@pytest.mark.parametrize("abbreviated, meant", [
    (["--max_step", "2"], "--max_steps"),
    (["--learning", "1e-3"], "--learning_rate"),
    (["--per_device_train_batch", "4"], "--per_device_train_batch_size"),
    (["--gradient_accumulation", "4"], "--gradient_accumulation_steps"),  # an upstream flag's prefix
])  # fmt: skip
def test_an_abbreviated_flag_is_refused_with_the_full_name(tmp_path, capsys, abbreviated, meant):
    with pytest.raises(SystemExit) as exc:
        parse_job(_base(tmp_path) + abbreviated)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {' '.join(abbreviated)} (did you mean: {abbreviated[0]} -> {meant}?)" in err
    assert "no abbreviations" in err


def test_an_abbreviation_in_args_json_is_refused_too(tmp_path, capsys):
    (tmp_path / "args.json").write_text(json.dumps({"model_name_or_path": str(TINY), "output_dir": str(tmp_path / "o"),
                                                    "cache_dir": str(MEDI.parent), "max_step": 2}))
    with pytest.raises(SystemExit) as exc:
        parse_job([str(tmp_path / "args.json")])
    assert exc.value.code == 2 and "unrecognized arguments: --max_step 2" in capsys.readouterr().err


def test_a_damaged_args_json_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "args.json").write_text('{"model_name_or_path": ')
    with pytest.raises(SystemExit) as exc:
        parse_job([str(tmp_path / "args.json")])
    assert exc.value.code == 2  # was 1, the code of bad input data, from a bare SystemExit(message)
    assert f"{tmp_path / 'args.json'}: not a JSON object of train.py flags" in capsys.readouterr().err


# -- --help is readable -------------------------------------------------------------------------------------------


def test_help_lists_the_options_that_matter_first_and_upstream_flags_compactly(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert len(lines) <= 110, f"{len(lines)} lines"  # was 467: two screens at most
    first = [line.split()[0] for line in lines if line.startswith("  --")]
    assert first[:3] == ["--debug", "--model_name_or_path", "--data"]
    upstream = text.index("upstream train.py flags")
    assert upstream > text.index("--max_grad_norm") and upstream < text.index("exit codes: 0 done; 1 bad input data")
    for flag in FLAGS:  # every upstream flag named once, in the compact list, none with a help paragraph of its own
        assert text.count(f"--{flag.name} ") + text.count(f"--{flag.name}\n") == 1, flag.name
        assert f"  --{flag.name} " not in text[:upstream]


def test_every_upstream_flag_still_parses_at_its_default(tmp_path):
    argv = _base(tmp_path)
    for flag in FLAGS:
        if flag.default is not None:
            argv += [f"--{flag.name}", *(map(str, flag.default) if isinstance(flag.default, list) else [str(flag.default)])]
    assert parse_job(argv) == parse_job(_base(tmp_path))


# -- the exit-code contract -----------------------------------------------------------------------------------------


def _boom(job):
    raise RuntimeError("something this trainer did not expect")


def test_an_internal_error_is_one_line_and_a_log_file_or_the_traceback_under_debug(tmp_path, capsys, monkeypatch):
    import trainer.loop

    monkeypatch.setattr(trainer.loop, "train", _boom)
    assert train_main(_base(tmp_path)) == 4
    err = capsys.readouterr().err
    assert err.startswith("internal error: RuntimeError: something this trainer did not expect; traceback in ")
    assert len(err.strip().splitlines()) == 1
    log = Path(err.strip().rsplit("traceback in ", 1)[1])
    assert "Traceback" in log.read_text() and "_boom" in log.read_text()
    log.unlink()
    assert train_main(_base(tmp_path) + ["--debug"]) == 4
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "_boom" in err


def test_a_missing_torch_is_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as it does where torch is not installed
    monkeypatch.delitem(sys.modules, "trainer.loop", raising=False)
    assert train_main(_base(tmp_path)) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: import of torch halted") and "training needs the train extra: pip install 'instructor-stack[train]'" in err


def test_help_and_option_errors_answer_without_importing_torch():
    """Importing torch took most of --help's 7.6 s on a loaded 2-core machine; the command needs it only to train."""
    code = "import sys, trainer.__main__, trainer.config; print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_an_interrupt_exits_130_and_says_how_to_continue(tmp_path, capsys, monkeypatch):
    import trainer.loop

    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.loop, "train", interrupted)
    assert train_main(_base(tmp_path)) == 130
    assert "continue with --resume_from_checkpoint latest" in capsys.readouterr().err


def test_a_model_that_is_an_engine_file_is_a_usage_error(tmp_path, capsys):
    argv = _base(tmp_path)
    argv[1] = str(tmp_path / "large.onnx")
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "an exported engine, not a checkpoint folder" in err and "hf download" not in err


# -- start-up progress ------------------------------------------------------------------------------------------------


def test_start_up_steps_say_what_they_do_and_how_long_they_took(tmp_path, capsys):
    out = tmp_path / "o"
    argv = _base(tmp_path) + ["--per_device_train_batch_size", "4", "--max_steps", "2", "--save_steps", "1", "--max_source_length", "32"]
    assert train_main(argv) == 0
    assert train_main(argv + ["--resume_from_checkpoint", str(out / "checkpoints" / "checkpoint-1")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("start-up: ")]
    stages = [
        f"validating and indexing {MEDI}", "planning the single-task batches", f"loading the model from {TINY}",
        "preparing the model and optimizer for 1 process on cpu", f"saving the trained model to {out}",
    ]  # fmt: skip
    done = [line for line in lines if ": done in " in line][: len(stages)]  # the first run's, in order
    assert len(done) == len(stages) and all(line.startswith(f"start-up: {s}") for line, s in zip(done, stages)), lines
    assert lines[1:3] == [done[0], f"start-up: {stages[1]} ..."]  # each step announced before it runs, closed after
    assert lines[0] == f"start-up: validating and indexing {MEDI} (every row, before step 1) ..."
    assert "(t5, 2.1M parameters)" in next(x for x in lines if x.startswith(f"start-up: loading the model from {TINY}: done"))
    assert any(x.startswith(f"start-up: restoring {out / 'checkpoints' / 'checkpoint-1'}: done in ") for x in lines)
    assert any("validated before: the index cached in data-index.npz is reused" in x for x in lines)


# -- trainer.INSTRUCTOR's errors --------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no CUDA GPU")
def test_instructor_on_cuda_without_a_gpu_says_so():
    from trainer import INSTRUCTOR
    from trainer.model import DeviceError

    with pytest.raises(DeviceError, match=r"device='cuda': torch sees no CUDA GPU \(torch .*\); use device='cpu'"):
        INSTRUCTOR(TINY, device="cuda")
    model = INSTRUCTOR(TINY, device="cpu")
    with pytest.raises(DeviceError, match="torch sees no CUDA GPU"):
        model.encode(["a text"], device="cuda:0")
    assert model.device.type == "cpu"


def test_instructor_with_an_unknown_device_name_says_so():
    from trainer import INSTRUCTOR
    from trainer.model import DeviceError

    with pytest.raises(DeviceError, match=r"device='gpu0': not a device name torch knows; use 'cpu', 'cuda' or 'cuda:N'"):
        INSTRUCTOR(TINY, device="gpu0")


@pytest.mark.parametrize("name", ["model.onnx", "large-int8.onnx", "large.plan", "large-bf16.pt2"])
def test_instructor_on_an_engine_file_names_runtime_instructor(tmp_path, name):
    from trainer import INSTRUCTOR
    from trainer.errors import ModelNotFoundError

    for path in (tmp_path / name, Path(name)):  # an engine on disk, or only its name
        if path.parent == tmp_path:
            path.write_bytes(b"an engine")
        with pytest.raises(ModelNotFoundError) as err:
            INSTRUCTOR(path)
        assert f"runtime.INSTRUCTOR({str(path)!r})" in str(err.value) and "hf download" not in str(err.value)


def test_instructor_on_another_file_says_a_folder_is_needed(tmp_path):
    from trainer import INSTRUCTOR
    from trainer.errors import ModelNotFoundError

    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="a file, not a model folder"):
        INSTRUCTOR(tmp_path / "weights.bin")
