"""Two CPU processes (gloo): gathered negatives and GradCache give the full-batch gradient; `accelerate launch` trains."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer import InstructorModel
from trainer.batching import local_slice
from trainer.features import TrainingFeaturizer
from trainer.step import contrastive_step

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "instructor-tiny"
MEDI = FIXTURES / "medi" / "medi-tiny.json"
ROOT = Path(__file__).parent.parent
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows() -> list[dict]:
    rows = [r for r in json.loads(MEDI.read_text(encoding="utf-8")) if r["task_name"] == "tiny_caption_entailment"]
    return rows[:8]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = InstructorModel.from_pretrained(TINY).eval()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    featurize = TrainingFeaturizer(model.tokenizer, 64, pad_to_max_length=True)
    rows = _rows()
    local = [rows[i] for i in local_slice(torch.arange(len(rows)).numpy(), rank, WORLD)]
    results = {}
    for name, chunk in (("direct", None), ("grad_cache", 5)):
        ddp.zero_grad(set_to_none=True)
        loss = contrastive_step(
            ddp, featurize(local, chunk), 0.1, torch.device("cpu"), grad_cache=chunk is not None, no_sync=ddp.no_sync
        )
        results[name] = (loss, _grads(model))
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_the_full_batch_gradient(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    model = InstructorModel.from_pretrained(TINY).eval()
    feats = TrainingFeaturizer(model.tokenizer, 64, pad_to_max_length=True)(_rows())
    ref_loss = contrastive_step(model, feats, 0.1, torch.device("cpu"))
    ref = _grads(model)
    scale = max(float(g.abs().max()) for g in ref.values())
    for rank in range(WORLD):
        for name, (loss, grads) in torch.load(tmp_path / f"rank{rank}.pt").items():
            assert loss == pytest.approx(ref_loss, rel=1e-6), (rank, name)
            assert grads.keys() == ref.keys()
            worst = max(float((grads[k] - ref[k]).abs().max()) for k in ref)
            assert worst <= 1e-5 * scale, f"rank {rank} {name}: max grad difference {worst:.3e} (scale {scale:.3e})"


def _train_cmd(launcher: list[str], out: Path, model: Path, per_device: int) -> list[str]:
    return launcher + [
        "-m", "trainer", "--model_name_or_path", str(model), "--data", str(MEDI), "--output_dir", str(out),
        "--per_device_train_batch_size", str(per_device), "--max_steps", "3", "--save_steps", "2",
        "--max_source_length", "64", "--pad_to_max_length", "--grad_cache_chunk_size", "5",
    ]  # fmt: skip


@pytest.mark.slow
def test_accelerate_launch_two_processes_trains_like_one(tmp_path):
    """The same global batch of 8 on 2 processes x 4 and on 1 x 8 (dropout off): the same losses, step by step."""
    model = tmp_path / "tiny-nodropout"
    shutil.copytree(TINY, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "dropout_rate": 0.0}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    two = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]  # fmt: skip
    runs = {
        "two": subprocess.Popen(_train_cmd(two, tmp_path / "two", model, 4), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        "one": subprocess.Popen(_train_cmd([sys.executable], tmp_path / "one", model, 8), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    }
    for name, proc in runs.items():
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, f"{name}:\n{output[-4000:]}"
    logs = {name: [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()] for name in runs}
    assert [r["step"] for r in logs["two"]] == [1, 2, 3]
    assert [r["task"] for r in logs["two"]] == [r["task"] for r in logs["one"]]
    for a, b in zip(logs["two"], logs["one"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "checkpoint-2" / "rng-1.safetensors").is_file()  # each process's RNG
    assert (tmp_path / "two" / "loss_curve.png").stat().st_size > 0
    trained = InstructorModel.from_pretrained(tmp_path / "two")
    assert trained.encode([["Represent the sentence: ", "a test"]]).shape == (1, 32)


def test_accelerate_cpu_launcher_is_refused_clearly():
    """accelerate's --cpu launcher starts one process for --num_processes 2 (no mpirun): say so instead of training."""
    from trainer.loop import LaunchError, check_launch

    with pytest.raises(LaunchError, match="--multi_gpu --num_processes N"):
        check_launch({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    check_launch({"ACCELERATE_USE_CPU": "True"})  # one process asked for, one started
    check_launch({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
