"""The training loop: Accelerate for devices, processes, mixed precision and checkpoints.

Resuming is exact: the batch plan is a pure function of (seed, epoch), so the data position is just the step
counter, saved with the model, optimizer, scheduler and every process's RNG state.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from trainer.batching import BatchPlan, local_slice
from trainer.checkpoint import CheckpointError
from trainer.data import DataError, MediIndex, RowReader
from trainer.features import TrainingFeaturizer
from trainer.metrics import StepLog, plot_loss
from trainer.model import InstructorModel
from trainer.step import contrastive_step

CHECKPOINTS = "checkpoints"


class TrainState:
    """The data position (optimizer steps done) and the settings a resumed run must share with the saved one."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.step = 0
        self.settings = settings

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "settings": self.settings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["settings"] != self.settings:
            diff = {k: (state["settings"].get(k), v) for k, v in self.settings.items() if state["settings"].get(k) != v}
            raise CheckpointError(f"the checkpoint was made with other settings (saved, now): {diff}")
        self.step = int(state["step"])


def latest_checkpoint(output_dir: Path) -> Path | None:
    folder = output_dir / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()] if folder.is_dir() else []
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def _load_index(accelerator: Accelerator, data: str, output_dir: Path) -> MediIndex:
    """The main process validates and indexes the data once (or reuses its cache); the others read the cache."""
    cache = output_dir / "data-index.npz"
    message: list[str | None] = [None]
    index = None
    if accelerator.is_main_process:
        try:
            index = MediIndex.load(cache, data)
            if index is None:
                index = MediIndex.build(data)
                index.save(cache)
        except DataError as exc:
            message = [str(exc)]
    broadcast_object_list(message)
    if message[0] is not None:
        raise DataError(message[0])
    if index is None:
        index = MediIndex.load(cache, data)
    return index


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int) -> None:
    """Write to a temporary folder and rename it, so a kill never leaves a half-written checkpoint-N."""
    final = output_dir / CHECKPOINTS / f"checkpoint-{step}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    accelerator.wait_for_everyone()


class LaunchError(RuntimeError):
    """The processes were not started as the user asked."""


def check_launch(env: dict[str, str] | None = None) -> None:
    """Refuse ``accelerate launch --cpu --num_processes N``: without mpirun accelerate starts ONE process for it.

    That launcher sets MASTER_ADDR (only when N > 1) but no rank variables; training would silently run with
    1/N of the global batch. ``--multi_gpu`` (torchrun underneath) works on CPU-only machines: see below.
    """
    env = os.environ if env is None else env
    ranked = any(k in env for k in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if env.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes") and "MASTER_ADDR" in env and not ranked:
        raise LaunchError(
            "accelerate launch --cpu --num_processes N starts a single process unless mpirun is used; "
            "for N CPU processes run `accelerate launch --multi_gpu --num_processes N -m trainer ...` "
            "(on a machine without CUDA the trainer then uses the gloo backend) or `torchrun --nproc_per_node N -m trainer ...`"
        )


def train(args: argparse.Namespace) -> Path:
    """Run training as ``args`` (see ``trainer.config``) says; returns the output folder."""
    check_launch()
    # cpu=True lets Accelerate set up gloo process groups under torchrun when there is no GPU.
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    main = accelerator.is_main_process
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    resume = None
    if args.resume_from_checkpoint:
        resume = latest_checkpoint(output_dir) if args.resume_from_checkpoint == "latest" else Path(args.resume_from_checkpoint)
        if resume is None or not resume.is_dir():
            raise CheckpointError(f"{args.resume_from_checkpoint}: no checkpoint to resume from (looked in {output_dir / CHECKPOINTS})")
    elif latest_checkpoint(output_dir) is not None and not args.overwrite_output_dir:
        raise CheckpointError(
            f"{output_dir}: already holds checkpoints; pass --resume_from_checkpoint latest to continue or --overwrite_output_dir to start afresh"
        )

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = args.per_device_train_batch_size * world
    if global_batch < 2:
        raise ValueError("the global batch (per_device_train_batch_size x processes) must be >= 2: the loss needs in-batch negatives")
    index = _load_index(accelerator, args.data, output_dir)
    plan = BatchPlan(tuple(index.rows_of_task()), global_batch, args.seed)
    if plan.steps_per_epoch == 0:
        raise DataError(f"{index.path}: no task has {global_batch} rows, the global batch size: nothing to train on")
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * plan.steps_per_epoch)
    if main:
        dropped = plan.dropped_per_epoch()
        print(
            f"{len(index)} rows, {len(index.task_keys)} tasks; global batch {global_batch} ({world} x {args.per_device_train_batch_size}); "
            f"{plan.steps_per_epoch} steps per epoch, {total} steps; "
            f"{sum(dropped.values())} rows of {len(dropped)} tasks left out each epoch (incomplete chunks)"
        )

    model = InstructorModel.from_pretrained(args.model_name_or_path)
    pooler = getattr(model.auto_model, "pooler", None)
    if pooler is not None:  # BERT's pooler output is not used: without a gradient it must not be trained (nor DDP-synced)
        pooler.requires_grad_(False)
    if args.gradient_checkpointing:
        model.auto_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=args.weight_decay
    )
    # The schedule counts global steps: it is not passed to prepare(), which would step it once per process.
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total), total)
    featurizer = TrainingFeaturizer(model.tokenizer, args.max_source_length, args.pad_to_max_length)
    model, optimizer = accelerator.prepare(model, optimizer)
    settings = {
        "seed": args.seed,
        "global_batch": global_batch,
        "processes": world,
        "data": str(index.path.resolve()),
        "grad_cache_chunk_size": args.grad_cache_chunk_size,
    }
    state = TrainState(settings)
    accelerator.register_for_checkpointing(scheduler, state)
    if resume is not None:
        accelerator.load_state(str(resume))
        if main:
            print(f"resumed from {resume} at step {state.step}")

    log = StepLog(output_dir / "train_log.jsonl", state.step) if main else None
    reader = RowReader(index)
    bar = tqdm(total=total, initial=state.step, desc="Training", unit="step", disable=not main)
    epoch_batches: tuple[int, list] = (-1, [])
    while state.step < total:
        epoch, position = divmod(state.step, plan.steps_per_epoch)
        if epoch_batches[0] != epoch:
            epoch_batches = (epoch, plan.epoch(epoch))
        rows = epoch_batches[1][position]
        started = time.perf_counter()
        chunks = featurizer(reader.rows(local_slice(rows, rank, world)), args.grad_cache_chunk_size or None)
        lr = scheduler.get_last_lr()[0]
        loss = contrastive_step(
            model,
            chunks,
            args.cl_temperature,
            accelerator.device,
            grad_cache=args.grad_cache_chunk_size > 0,
            backward=accelerator.backward,
            no_sync=lambda: accelerator.no_sync(model),
            autocast=accelerator.autocast,
        )
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        seconds = time.perf_counter() - started
        if main:
            task = index.task_keys[int(index.task[rows[0]])]
            log.write(
                {
                    "step": state.step,
                    "epoch": epoch,
                    "task": task,
                    "loss": loss,
                    "lr": lr,
                    "examples_per_s": global_batch / seconds,
                    "seconds": seconds,
                }
            )
            bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{global_batch / seconds:.1f}", lr=f"{lr:.2e}")
        bar.update(1)
        if state.step % args.save_steps == 0 and state.step < total:
            _save_checkpoint(accelerator, output_dir, state.step)
    bar.close()
    reader.close()

    accelerator.wait_for_everyone()
    if main:
        accelerator.unwrap_model(model).save(output_dir)
        if (output_dir / "train_log.jsonl").stat().st_size:
            plot_loss(output_dir / "train_log.jsonl", output_dir / "loss_curve.png")
        print(f"saved the trained model to {output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir
