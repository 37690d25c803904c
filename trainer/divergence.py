"""Stop a diverged run before a NaN reaches a saved model: the loss, the gradient and the weights are checked.

With a learning rate far too high (or fp16 overflow in the encoder) the loss turns NaN; one optimizer step on it
makes every weight NaN, and a run that carried on would save NaN weights as "the trained model". Each step's loss
and gradient norm are checked before the optimizer step (so the failing step is never applied), and the weights
before every save. Under several processes each check is one all-reduce (MAX) of the local flags: every process
takes the same decision at the same step, so none stops alone while the others wait in the next collective.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.distributed as dist

from trainer.errors import DivergedError


def _finite(value: float | torch.Tensor | None) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(value)


def nonfinite_anywhere(values: Mapping[str, float | torch.Tensor | None], device: torch.device | str) -> list[str]:
    """The names of ``values`` that are NaN or infinite on this process or any other (None: not checked here).

    Every process must call it at the same point with the same names: it is a collective under torch.distributed.
    """
    names = list(values)
    flags = torch.tensor([0.0 if _finite(values[n]) else 1.0 for n in names], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [n for n, flag in zip(names, flags.tolist()) if flag]


def weights_finite(parameters: Iterable[torch.Tensor]) -> bool:
    """Whether every weight is a finite number (one pass over the parameters, at save time only)."""
    return all(bool(torch.isfinite(p).all()) for p in parameters)


def gradient_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """The total L2 norm of the gradients (what clipping computes), for a run with clipping off; None without any."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def diverged(step: int, what: str, lr: float, last: Path | None, world: int, applied: bool = False) -> DivergedError:
    """The one-line error of a run stopped at ``step``: what was not finite, what was kept, what to do next.

    ``applied``: the step's optimizer update ran (the weights it made NaN were caught before a save), else it did not.
    """
    where = " on at least one process" if world > 1 else ""
    kept = (
        f"the newest checkpoint (its weights are finite) is {last}: resume from it, or from an earlier one if the loss "
        "was already climbing (train_log.jsonl), with --resume_from_checkpoint PATH and a lower --learning_rate "
        "(with --fp16: --bf16 or --mixed_precision no)"
        if last is not None
        else "no checkpoint was written yet: start again with a lower --learning_rate and --overwrite_output_dir"
    )
    return DivergedError(
        f"step {step}: {what} {'are' if ' and ' in what else 'is'} NaN or infinite{where} (learning rate {lr:.3g}): training diverged and stopped; "
        f"{'its weights were not saved' if applied else 'nothing of this step was applied'} and no trained model was saved; {kept}"
    )
