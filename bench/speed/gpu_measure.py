"""What the GPU check measures for every contender (an eager baseline, a peer or an engine), in one place, so that
each figure is computed the same way for all of them.

- Workloads (``Workloads``): texts of exactly 128 and 512 tokens (instruction and ``</s>`` included), the realistic
  length mix of ``bench.speed.length_mix``, batch-1 texts of 32 and 128 tokens, and a parity set (the first rows of
  the mix), all built from the checkpoint's tokenizer and identical in every process.
- Throughput (``throughput``): a probe finds the contender's speed, the pass is sized to about ``pass_seconds``
  (so a slow fp32 baseline and a fast engine are timed over similar wall time, never over a fixed doc count
  that takes one of them a minute), one untimed pass at that size, then the median of ``repeats`` timed passes.
  docs/s, docs/hour, real tokens/s, and MFU = useful FLOP/s (real tokens only, ``bench.common.flop_model``) over
  the card's dense peak for the math the contender uses (``PEAKS``).
- Padding waste (``padding_waste_*``): the share of computed positions that were padding, for each batching rule.
- GPU memory (``GpuMemory``): ``mem_get_info`` before and after loading (AOTInductor keeps its weights outside
  PyTorch's allocator, so the allocator alone undercounts an engine), and the allocator's peak while measuring.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from bench.common import DOC_INSTRUCTION, FlopModel, padded_tokens_in_order, padded_tokens_sorted

# Dense (no 2:4 sparsity) peaks from NVIDIA's datasheets, TFLOP/s, per card and per math: fp32 on CUDA cores (TF32
# off), TF32 tensor cores, and bf16/fp16 tensor cores (the same peak). A100: SXM and PCIe alike.
PEAKS: dict[str, dict[str, float]] = {
    "H100 SXM": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "H200": {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0},
}
# torch.cuda.get_device_name -> card, first match wins (so "H200 NVL" before "H200", "L40S" before "L4"):
# "NVIDIA H100 80GB HBM3" is the SXM card, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" the others.
CARD_PATTERNS = [
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b", "H200"),
    (r"\bA100\b", "A100"),
    (r"\bL40S\b", "L40S"),
    (r"\bL4\b", "L4"),
]
MATH = {"fp32": "fp32", "tf32": "tf32", "bf16": "bf16", "fp16": "bf16"}  # contender precision -> peak column


def card_for(gpu_name: str | None) -> str | None:
    """The ``PEAKS`` row of a GPU by its CUDA name, or None for a card not in the table."""
    for pattern, card in CARD_PATTERNS:
        if gpu_name and re.search(pattern, gpu_name, re.IGNORECASE):
            return card
    return None


def peak_tflops(gpu_name: str | None, precision: str) -> float | None:
    """The dense peak of the math ``precision`` runs on (fp32, tf32, bf16, fp16), on this card."""
    card = card_for(gpu_name)
    return PEAKS[card][MATH[precision]] if card else None


@dataclass
class Workloads:
    """Every input the check feeds a contender, built once from the checkpoint's tokenizer (deterministic)."""

    fixed: dict[int, list[Any]]  # tokens -> items of exactly that many tokens
    mix: list[Any]
    latency: dict[int, list[Any]]  # tokens -> one item
    parity: list[Any]
    lengths: dict[str, np.ndarray] = field(default_factory=dict)  # cell -> token counts of its items

    @classmethod
    def build(cls, model: Any, tokens: list[int], latency_tokens: list[int], docs_tokens: int, mix_docs: int, parity_rows: int, seed: int = 0) -> "Workloads":
        from bench.speed.latency import texts_of_length
        from bench.speed.length_mix import mix_items

        fixed = {}
        for n in tokens:
            one = texts_of_length(model.tokenizer, model.architecture, n, 8)
            fixed[n] = [one[i % len(one)] for i in range(max(1, docs_tokens // n))]
        mix = mix_items(model.tokenizer, DOC_INSTRUCTION, mix_docs, seed)
        latency = {n: texts_of_length(model.tokenizer, model.architecture, n, 1) for n in latency_tokens}
        work = cls(fixed, mix, latency, mix[:parity_rows])
        work.lengths = {str(n): model.tokenizer.encode(items).lengths for n, items in fixed.items()}
        work.lengths["mix"] = model.tokenizer.encode(mix).lengths
        return work

    def cells(self) -> dict[str, list[Any]]:
        """Throughput cells by name: "128", "512", "mix"."""
        return {**{str(n): items for n, items in self.fixed.items()}, "mix": self.mix}


def throughput(
    run: Callable[[list[Any]], Any],
    items: list[Any],
    lengths: np.ndarray,
    fm: FlopModel,
    peak: float | None,
    pass_seconds: float,
    repeats: int,
    probe_rows: int,
) -> dict[str, Any]:
    """Time ``run`` on a prefix of ``items`` sized to about ``pass_seconds`` a pass (see the module doc)."""
    probe = items[: max(1, min(probe_rows, len(items)))]
    run(probe)  # first shapes, allocator, kernels' first launch
    per_doc = timed(lambda: run(probe)) / len(probe)
    n = int(min(len(items), max(len(probe), math.ceil(pass_seconds / max(per_doc, 1e-9)))))
    docs = items[:n]
    if n != len(probe):
        run(docs)  # the pass's own shapes, untimed
    secs = [timed(lambda: run(docs)) for _ in range(repeats)]
    med = statistics.median(secs)
    real_tokens = int(np.sum(lengths[:n]))
    flops = fm.flops(lengths[:n])
    return {
        "docs": n,
        "real_tokens": real_tokens,
        "seconds_all": [round(s, 4) for s in secs],
        "docs_per_s": n / med,
        "docs_per_hour": 3600 * n / med,
        "tokens_per_s": real_tokens / med,
        "useful_tflops": flops / med / 1e12,
        "mfu": flops / med / 1e12 / peak if peak else None,
    }


def latency(call: Callable[[], Any], iters: int, max_seconds: float) -> dict[str, float]:
    from bench.speed.latency import measure, percentiles

    return percentiles(measure(call, iters, warmup=5, max_seconds=max_seconds))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def padding_waste_sorted(lengths: np.ndarray, batch_size: int) -> float:
    """``INSTRUCTOR.encode``'s rule (the reference, eager baselines): sorted by tokens, fixed rows per batch."""
    return 1.0 - float(np.sum(lengths)) / padded_tokens_sorted(lengths, batch_size)


def padding_waste_in_order(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> float:
    """Batches of ``batch_size`` rows taken in ``order``, each padded to its longest row (sentence-transformers
    sorts by characters, not tokens: its order is passed in)."""
    lengths = np.asarray(lengths)
    return 1.0 - float(np.sum(lengths)) / padded_tokens_in_order(lengths[order], batch_size)


class GpuMemory:
    """Device memory around one contender: free memory before and after loading, and the allocator's peak."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.on = device.startswith("cuda") and torch.cuda.is_available()
        self.device = torch.device(device) if self.on else None
        self.before: tuple[int, int] | None = None
        self.after_load: tuple[int, int] | None = None

    def start(self) -> None:
        if not self.on:
            return
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.empty_cache()
        self.torch.cuda.reset_peak_memory_stats(self.device)
        self.before = self.torch.cuda.mem_get_info(self.device)

    def loaded(self) -> None:
        if self.on:
            self.torch.cuda.synchronize(self.device)
            self.after_load = self.torch.cuda.mem_get_info(self.device)

    def report(self) -> dict[str, Any]:
        if not self.on or self.before is None or self.after_load is None:
            return {"measured": False, "why": "no CUDA device"}
        mib = 2**20
        free_now, total = self.torch.cuda.mem_get_info(self.device)
        return {
            "measured": True,
            "total_mib": round(total / mib),
            "free_before_load_mib": round(self.before[0] / mib),
            "load_took_mib": round((self.before[0] - self.after_load[0]) / mib),
            "allocator_peak_mib": round(self.torch.cuda.max_memory_allocated(self.device) / mib),
            "allocator_reserved_mib": round(self.torch.cuda.memory_reserved(self.device) / mib),
            "device_used_after_mib": round((total - free_now) / mib),
        }
