"""The INSTRUCTOR contrastive loss (upstream train.py, 1.0.1 era) and its cross-process form.

With ``s(a, b) = cos(a, b) / tau`` and batch size B:
- query side: row i is ``[s(q_i, p_i), s(q_i, n_1), ..., s(q_i, n_B)]`` with target 0;
- reverse side: row i is ``[s(p_i, q_i)] + [s(p_i, q_j) for j != i]`` with target 0, which is the cross-entropy
  of the row ``[s(p_i, q_1), ..., s(p_i, q_B)]`` with target i (cross-entropy does not depend on the order
  of the logits);
- ``L = CE_mean(query side) + CE_mean(reverse side)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def instructor_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, temperature: float) -> torch.Tensor:
    """The loss of one single-task batch of B (query, positive, hard negative) embeddings, in fp32."""
    q, p, n = (F.normalize(t.float(), p=2, dim=-1) for t in (q, p, n))
    batch = q.shape[0]
    forward = torch.cat([(q * p).sum(-1, keepdim=True), q @ n.T], dim=1) / temperature
    reverse = (p @ q.T) / temperature
    targets = torch.arange(batch, device=q.device)
    return F.cross_entropy(forward, torch.zeros_like(targets)) + F.cross_entropy(reverse, targets)


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """All processes' tensors concatenated in rank order; only this process's slice carries its autograd graph.

    Every process then computes the loss of the whole global batch, so the gradient that reaches the local slice
    is the full-batch gradient with respect to the local embeddings; summed over processes (DDP averages, hence
    the loss is scaled by the world size) it is the gradient of the full-batch loss.
    """
    rank, size = world()
    if size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.detach().contiguous())
    parts[rank] = local
    return torch.cat(parts, dim=0)


def global_loss(local: torch.Tensor, temperature: float) -> torch.Tensor:
    """The full global-batch loss from this process's embeddings stacked as ``[queries; positives; negatives]``."""
    everything = gather_with_grad(local)
    _, size = world()
    per = local.shape[0] // 3
    blocks = everything.view(size, 3, per, -1)
    q, p, n = (blocks[:, k].reshape(size * per, -1) for k in range(3))
    return instructor_loss(q, p, n, temperature)
