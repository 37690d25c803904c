"""Single-task global batches, split across processes, deterministic given the seed.

Each task's rows are cut into full chunks of the global batch size (``per_device_batch * num_processes``); the
incomplete remainder of every task is dropped for that epoch, as upstream drops chunks that are not full and
single-task. The chunks of all tasks are then shuffled with the seed. Epoch 0 takes each task's rows in file
order (upstream's contiguous chunks); every later epoch first permutes the rows inside each task, so the in-batch
negatives change from epoch to epoch. Every process computes the same plan from the same seed and takes its own
contiguous slice of each global batch, so all processes work on the same task at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchPlan:
    rows_of_task: tuple[np.ndarray, ...]  # row numbers of each task, in file order
    global_batch: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return sum(len(rows) // self.global_batch for rows in self.rows_of_task)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The global batches of one epoch, in training order: each an int64 array of ``global_batch`` rows of one task."""
        rng = np.random.default_rng([self.seed, epoch])
        chunks: list[np.ndarray] = []
        for rows in self.rows_of_task:
            if epoch > 0:
                rows = rng.permutation(rows)
            full = len(rows) // self.global_batch
            chunks.extend(np.asarray(rows[: full * self.global_batch], np.int64).reshape(full, self.global_batch))
        order = rng.permutation(len(chunks))
        return [chunks[i] for i in order]

    def dropped_per_epoch(self) -> dict[int, int]:
        """Rows each task leaves out every epoch (its remainder after full chunks), for tasks that leave any."""
        return {t: len(r) % self.global_batch for t, r in enumerate(self.rows_of_task) if len(r) % self.global_batch}


def local_slice(global_rows: np.ndarray, process_index: int, num_processes: int) -> np.ndarray:
    """This process's contiguous share of a global batch (rank r takes rows r*b .. (r+1)*b - 1)."""
    per = len(global_rows) // num_processes
    return global_rows[process_index * per : (process_index + 1) * per]
