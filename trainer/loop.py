"""The training loop: Accelerate for devices, processes and mixed precision; ``trainer.state`` for checkpoints.

``train`` runs its steps in order: check the launch and the output folder, index the data and plan the batches,
build the model and optimizer, restore a checkpoint, run the optimizer steps, save the model. Resuming is exact:
the batch plan is a pure function of (seed, epoch), so the data position is just the step counter, saved with the
model, optimizer, scheduler and every process's RNG state.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from trainer.batching import BatchPlan, local_slice
from trainer.config import TrainJob
from trainer.data import DataError, MediIndex, RowReader
from trainer.divergence import diverged, gradient_norm, nonfinite_anywhere, weights_finite
from trainer.errors import ConfigError, LaunchError
from trainer.features import TrainingFeaturizer
from trainer.metrics import StepLog, plot_loss
from trainer.model import InstructorModel
from trainer.model_source import local_model_folder
from trainer.progress import stage
from trainer.state import check_files, load_training_state, read_train_state, save_training_state
from trainer.step import contrastive_step

CHECKPOINTS = "checkpoints"
# Files that make a folder a model (ours, sentence-transformers', transformers'): an output holding one is not reused.
MODEL_FILES = ("modules.json", "config.json", "model.safetensors", "pytorch_model.bin", "config_sentence_transformers.json")


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


def sorted_checkpoints(output_dir: Path) -> list[Path]:
    """The finished ``checkpoints/checkpoint-N`` folders, oldest first."""
    folder = output_dir / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest finished checkpoint, or None."""
    found = sorted_checkpoints(output_dir)
    return found[-1] if found else None


def _file_in_the_way(folder: Path) -> Path | None:
    """The file at ``folder`` or at the nearest existing folder above it, which stops it from being a folder; else None."""
    for path in (folder, *folder.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def check_output_dir(job: TrainJob) -> Path | None:
    """Refuse an output that would destroy a model or cannot be a folder; return the checkpoint to resume from (or None).

    The source model's folder is never an output (the trained ``model.safetensors`` would sit beside its ``.bin``
    and win at load). A folder holding a model or checkpoints needs ``--overwrite_output_dir``, unless the run
    resumes from it.
    """
    output_dir, source = Path(job.output_dir), Path(job.model_name_or_path)
    blocker = _file_in_the_way(output_dir)
    if blocker is not None:
        where = "is a file" if blocker == output_dir else f"is under {blocker}, which is a file"
        raise ConfigError(f"{output_dir}: --output_dir {where}, not a folder; give a folder (it is created if missing)")
    if output_dir.resolve() == source.resolve() or (output_dir.exists() and source.exists() and output_dir.samefile(source)):
        raise ConfigError(f"{output_dir}: --output_dir is the model being trained from (--model_name_or_path); choose another folder")
    if job.resume_from_checkpoint:
        resume = latest_checkpoint(output_dir) if job.resume_from_checkpoint == "latest" else Path(job.resume_from_checkpoint)
        if resume is None or not resume.is_dir():
            raise ConfigError(f"{job.resume_from_checkpoint}: no checkpoint to resume from (looked in {output_dir / CHECKPOINTS})")
        return resume
    if job.overwrite_output_dir:
        return None
    if latest_checkpoint(output_dir) is not None:
        raise ConfigError(
            f"{output_dir}: already holds checkpoints; pass --resume_from_checkpoint latest to continue or --overwrite_output_dir to start afresh"
        )
    found = [name for name in MODEL_FILES if (output_dir / name).exists()]
    if found:
        raise ConfigError(
            f"{output_dir}: already holds a model ({', '.join(found)}); pass --overwrite_output_dir to replace it or choose another --output_dir"
        )
    return None


def _load_index(accelerator: Accelerator, data: str, output_dir: Path) -> MediIndex:
    """The main process validates and indexes the data once (or reuses its cache); the others read the cache."""
    cache = output_dir / "data-index.npz"
    message: list[str | None] = [None]
    index = None
    if accelerator.is_main_process:
        try:
            with stage(f"validating and indexing {data} (every row, before step 1)") as note:
                index = MediIndex.load(cache, data)
                if index is None:
                    index = MediIndex.build(data)
                    index.save(cache)
                    note.detail = f"{len(index)} rows"
                else:
                    note.detail = f"{len(index)} rows, validated before: the index cached in {cache.name} is reused"
        except DataError as exc:
            message = [str(exc)]
    broadcast_object_list(message)
    if message[0] is not None:
        raise DataError(message[0])
    if index is None:
        index = MediIndex.load(cache, data)
    return index


@dataclass
class Run:
    """Everything the steps share: the prepared model and optimizer, the schedule, the data and the plan."""

    accelerator: Accelerator
    model: Any
    optimizer: Any
    scheduler: Any
    featurizer: TrainingFeaturizer
    index: MediIndex
    plan: BatchPlan
    total: int
    settings: dict[str, Any]
    step: int = 0


def plan_run(job: TrainJob, accelerator: Accelerator, output_dir: Path) -> tuple[MediIndex, BatchPlan, int]:
    """Index the data (every row validated before step 1) and plan the single-task global batches."""
    world = accelerator.num_processes
    global_batch = job.per_device_train_batch_size * world
    if global_batch < 2:
        raise ConfigError("the global batch (per_device_train_batch_size x processes) must be >= 2: the loss needs in-batch negatives")
    index = _load_index(accelerator, job.data, output_dir)
    with stage("planning the single-task batches", accelerator.is_main_process) as note:
        plan = BatchPlan(tuple(index.rows_of_task()), global_batch, job.seed)
        note.detail = f"{plan.steps_per_epoch} steps per epoch"
    if plan.steps_per_epoch == 0:
        raise ConfigError(
            f"{index.path}: no task has {global_batch} rows, the global batch size: nothing to train on; "
            "lower --per_device_train_batch_size"
        )
    total = job.max_steps if job.max_steps > 0 else math.ceil(job.num_train_epochs * plan.steps_per_epoch)
    if accelerator.is_main_process:
        dropped = plan.dropped_per_epoch()
        print(
            f"{len(index)} rows, {len(index.task_keys)} tasks; global batch {global_batch} ({world} x {job.per_device_train_batch_size}); "
            f"{plan.steps_per_epoch} steps per epoch, {total} steps ({job.warmup_steps_of(total)} of warmup); "
            f"{sum(dropped.values())} rows of {len(dropped)} tasks left out each epoch (incomplete chunks)"
        )
        gpus = torch.cuda.device_count()
        if world == 1 and gpus > 1:
            print(
                f"note: {gpus} GPUs are visible and one is used. Upstream `python train.py` ran on all of them (DataParallel, "
                f"a global batch of {gpus} x per_device_train_batch_size); for that here: "
                f"accelerate launch --multi_gpu --num_processes {gpus} -m trainer ..."
            )
    return index, plan, total


def build_run(job: TrainJob, accelerator: Accelerator, index: MediIndex, plan: BatchPlan, total: int) -> Run:
    """The model, AdamW and the linear warmup/decay schedule, prepared for this process."""
    main = accelerator.is_main_process
    with stage(f"loading the model from {job.model_name_or_path}", main) as note:
        model = InstructorModel.from_pretrained(job.model_name_or_path)
        note.detail = f"{model.architecture}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
    pooler = getattr(model.auto_model, "pooler", None)
    if pooler is not None:  # BERT's pooler output is not used: without a gradient it must not be trained (nor DDP-synced)
        pooler.requires_grad_(False)
    if job.gradient_checkpointing:
        model.auto_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=job.peak_learning_rate, weight_decay=job.weight_decay,
        betas=(job.adam_beta1, job.adam_beta2), eps=job.adam_epsilon,
    )
    # The schedule counts global steps: it is not passed to prepare(), which would step it once per process.
    scheduler = get_linear_schedule_with_warmup(optimizer, job.warmup_steps_of(total), total)
    featurizer = TrainingFeaturizer(model.tokenizer, job.max_source_length, job.pad_to_max_length)
    world = accelerator.num_processes
    with stage(f"preparing the model and optimizer for {world} process{'es' if world > 1 else ''} on {accelerator.device}", main):
        model, optimizer = accelerator.prepare(model, optimizer)
    settings = {
        "seed": job.seed,
        "global_batch": plan.global_batch,
        "processes": accelerator.num_processes,
        "data": str(index.path.resolve()),
        "grad_cache_chunk_size": job.grad_cache_chunk_size,
    }
    return Run(accelerator, model, optimizer, scheduler, featurizer, index, plan, total, settings)


def save_checkpoint(run: Run, output_dir: Path, keep: int | None = None) -> None:
    """Write checkpoint-N into a temporary folder and rename it, so a kill never leaves a half-written checkpoint.

    With ``keep`` (``--save_total_limit``), only the newest ``keep`` checkpoints are left once the new one is in place.
    """
    acc = run.accelerator
    final = output_dir / CHECKPOINTS / f"checkpoint-{run.step}"
    partial = final.with_name(final.name + ".partial")
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    acc.wait_for_everyone()
    main = acc.is_main_process
    save_training_state(
        partial, acc.process_index, acc.unwrap_model(run.model) if main else None, run.optimizer, run.scheduler,
        acc.scaler, {"step": run.step, "settings": run.settings},
    )
    acc.wait_for_everyone()
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if keep is not None:
            for old in sorted_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    acc.wait_for_everyone()


def _apply_learning_rate(run: Run, learning_rate: float) -> float | None:
    """Make ``learning_rate`` the peak of the restored schedule from the current step on; the checkpoint's when it differed.

    The optimizer and schedule states restore the learning rate the checkpoint was made with; after a diverged
    run the way on is that checkpoint with a lower rate, so a ``--learning_rate`` given on resume is applied (a
    resume without one keeps the checkpoint's: ``TrainJob.learning_rate`` is None then).
    """
    sched = run.scheduler
    before = sched.base_lrs[0]
    if all(base == learning_rate for base in sched.base_lrs):
        return None
    sched.base_lrs = [learning_rate] * len(sched.base_lrs)
    for group, factor in zip(run.optimizer.param_groups, (f(sched.last_epoch) for f in sched.lr_lambdas)):
        group["initial_lr"], group["lr"] = learning_rate, learning_rate * factor
    sched._last_lr = [group["lr"] for group in run.optimizer.param_groups]  # what get_last_lr() reports until the next step
    return before


def restore_checkpoint(run: Run, folder: Path, learning_rate: float | None = None) -> None:
    """Load ``folder`` into this process; the settings that fix the batch plan must be the saved ones.

    A damaged file stops the run with a ``CheckpointError`` naming it; other settings with a ``ConfigError``.
    """
    acc = run.accelerator
    with stage(f"restoring {folder}", acc.is_main_process):
        check_files(folder)
        saved = read_train_state(folder)
        if saved["settings"] != run.settings:
            diff = {k: (saved["settings"].get(k), v) for k, v in run.settings.items() if saved["settings"].get(k) != v}
            raise ConfigError(f"{folder}: the checkpoint was made with other settings (saved, now): {diff}")
        load_training_state(folder, acc.process_index, acc.unwrap_model(run.model), run.optimizer, run.scheduler, acc.scaler)
        run.step = saved["step"]
        before = _apply_learning_rate(run, learning_rate) if learning_rate is not None else None
    if acc.is_main_process:
        print(f"resumed from {folder} at step {run.step}")
        if before is not None:
            print(f"note: --learning_rate {learning_rate:g} replaces the checkpoint's {before:g} from step {run.step + 1} on", file=sys.stderr)


def _stop_if_diverged(run: Run, output_dir: Path, lr: float, values: dict[str, Any], step: int, applied: bool = False) -> None:
    """Raise ``DivergedError`` on every process when any of ``values`` is NaN or infinite on any process."""
    bad = nonfinite_anywhere(values, run.accelerator.device)
    if bad:
        raise diverged(step, " and ".join(bad), lr, latest_checkpoint(output_dir), run.accelerator.num_processes, applied)


def _check_weights(run: Run, output_dir: Path, lr: float) -> None:
    """Before a save: weights that an optimizer step made NaN are never written as a checkpoint or a model."""
    ok = weights_finite(run.accelerator.unwrap_model(run.model).parameters())
    _stop_if_diverged(run, output_dir, lr, {"a weight": 0.0 if ok else math.nan}, run.step, applied=True)


def run_steps(run: Run, job: TrainJob, output_dir: Path) -> None:
    """Optimizer steps from ``run.step`` to ``run.total``, with a log line per step and a checkpoint every save_steps.

    A NaN or infinite loss or gradient norm (on any process) raises ``DivergedError`` before that step's optimizer
    step; the checkpoints already written stay as they are.
    """
    main = run.accelerator.is_main_process
    log = StepLog(output_dir / "train_log.jsonl", run.step) if main else None
    reader = RowReader(run.index)
    bar = tqdm(total=run.total, initial=run.step, desc="Training", unit="step", disable=not main)
    try:
        _steps(run, job, output_dir, reader, bar, log)
    finally:
        bar.close()
        reader.close()


def _steps(run: Run, job: TrainJob, output_dir: Path, reader: RowReader, bar: Any, log: StepLog | None) -> None:
    acc = run.accelerator
    main, rank, world = acc.is_main_process, acc.process_index, acc.num_processes
    epoch_batches: tuple[int, list] = (-1, [])
    while run.step < run.total:
        epoch, position = divmod(run.step, run.plan.steps_per_epoch)
        if epoch_batches[0] != epoch:
            epoch_batches = (epoch, run.plan.epoch(epoch))
        rows = epoch_batches[1][position]
        started = time.perf_counter()
        chunks = run.featurizer(reader.rows(local_slice(rows, rank, world)), job.grad_cache_chunk_size or None)
        lr = run.scheduler.get_last_lr()[0]
        loss = contrastive_step(
            run.model, chunks, job.cl_temperature, acc.device, grad_cache=job.grad_cache_chunk_size > 0,
            backward=acc.backward, no_sync=lambda: acc.no_sync(run.model), autocast=acc.autocast,
        )
        if job.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(run.model.parameters(), job.max_grad_norm)
        else:
            norm = gradient_norm(run.model.parameters())
        # fp16's grad scaler skips a step whose gradients overflowed and lowers its scale: that is not divergence
        checked = {"the loss": loss, "the gradient norm": norm if acc.scaler is None else None}
        _stop_if_diverged(run, output_dir, lr, checked, run.step + 1)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        seconds = time.perf_counter() - started
        if main:
            task = run.index.task_keys[int(run.index.task[rows[0]])]
            speed = run.plan.global_batch / seconds
            log.write({"step": run.step, "epoch": epoch, "task": task, "loss": loss, "lr": lr, "examples_per_s": speed, "seconds": seconds})
            bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{speed:.1f}", lr=f"{lr:.2e}")
        bar.update(1)
        if run.step % job.save_steps == 0 and run.step < run.total:
            _check_weights(run, output_dir, lr)
            save_checkpoint(run, output_dir, job.save_total_limit)


def save_final(run: Run, output_dir: Path) -> None:
    """Write the trained model (never NaN weights: a diverged last step stops here) and the loss curve."""
    acc = run.accelerator
    _check_weights(run, output_dir, run.scheduler.get_last_lr()[0])
    acc.wait_for_everyone()
    if acc.is_main_process:
        with stage(f"saving the trained model to {output_dir}"):
            acc.unwrap_model(run.model).save(output_dir)
            if (output_dir / "train_log.jsonl").stat().st_size:
                plot_loss(output_dir / "train_log.jsonl", output_dir / "loss_curve.png")
        print(f"saved the trained model to {output_dir}")
    acc.wait_for_everyone()
    acc.end_training()


def train(job: TrainJob) -> Path:
    """Run training as ``job`` says (see ``trainer.config``); returns the output folder."""
    check_launch()
    # A hub name (upstream's sentence-transformers/gtr-t5-large) is used from a cache it was downloaded into, or refused.
    job = dataclasses.replace(job, model_name_or_path=str(local_model_folder(job.model_name_or_path, job.cache_dir)))
    resume = check_output_dir(job)
    # cpu=True lets Accelerate set up gloo process groups under torchrun when there is no GPU.
    accelerator = Accelerator(mixed_precision=job.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(job.seed)
    output_dir = Path(job.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    index, plan, total = plan_run(job, accelerator, output_dir)
    run = build_run(job, accelerator, index, plan, total)
    if resume is not None:
        restore_checkpoint(run, resume, job.learning_rate)
    run_steps(run, job, output_dir)
    save_final(run, output_dir)
    return output_dir
