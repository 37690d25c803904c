"""One optimizer step's forward and backward: direct, or GradCache-style for batches larger than memory.

GradCache (Gao et al., 2021): embed every chunk without a graph, compute the loss and its gradient with respect
to the embeddings only, then re-run each chunk with a graph and backpropagate the cached gradient through it.
Memory is bounded by one chunk's activations while the loss sees the whole batch. The random state (dropout) of
each chunk is captured before its first pass and replayed for the second, so both passes compute the same
function and the gradient is exact.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Sequence

import torch

from trainer.loss import global_loss, world

Chunk = dict[str, torch.Tensor]


class RngState:
    """The CPU and current-CUDA-device generator states, to replay one chunk's dropout masks."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        devices = [torch.cuda.current_device()] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda)
            yield


def _to(chunk: Chunk, device: torch.device) -> Chunk:
    return {k: v.to(device, non_blocking=True) for k, v in chunk.items()}


def contrastive_step(
    model: torch.nn.Module,
    chunks: Sequence[Chunk],
    temperature: float,
    device: torch.device,
    grad_cache: bool = False,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], ContextManager] = nullcontext,
    autocast: Callable[[], ContextManager] = nullcontext,
) -> float:
    """Forward and backward of one global batch (this process holds ``chunks`` of ``[q; p; n]``); returns the loss.

    ``backward`` is ``accelerator.backward`` in training (loss scaling for fp16); ``no_sync`` is the DDP context
    that defers the gradient all-reduce, used for every GradCache chunk but the last. The loss is multiplied by
    the world size before backward because DDP averages gradients and each process's gradient is its share of
    the full-batch gradient (see ``gather_with_grad``).
    """
    _, size = world()
    if not grad_cache:
        with autocast():
            local = torch.cat([model(**_to(c, device)) for c in chunks])
        loss = global_loss(local, temperature)
        backward(loss * size)
        return float(loss.detach())

    states, embeddings = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState())
            with autocast():
                embeddings.append(model(**_to(chunk, device)).float())
    local = torch.cat(embeddings).requires_grad_()
    loss = global_loss(local, temperature)
    (loss * size).backward()
    cached = local.grad.split([len(e) for e in embeddings])
    for k, (chunk, state, grad) in enumerate(zip(chunks, states, cached)):
        with nullcontext() if k == len(chunks) - 1 else no_sync():
            with state.replay(), autocast():
                surrogate = (model(**_to(chunk, device)).float() * grad).sum()
            backward(surrogate)
    return float(loss.detach())
