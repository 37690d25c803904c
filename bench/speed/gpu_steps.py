"""``python -m bench.speed.gpu_steps --out FILE --checkpoint CKPT (--baselines ... | --engine NAME=PATH ...)``: the
GPU check's measurements of contenders, each measured the same way (``bench.speed.gpu_measure``).

Contenders:
- eager baselines of the checkpoint, in this order: ``fp32`` (``trainer.InstructorModel.encode``, the reference,
  TF32 off), ``tf32`` (the same with TF32 matmuls), ``bf16`` (``model.to(torch.bfloat16)``), and the peer a user
  would pick, ``st-bf16``: sentence-transformers in bf16 with its own INSTRUCTOR support (the prompt left out of
  the mean pooling, one prompt per ``encode`` call);
- engine bundles (``--engine NAME=PATH``: ``.pt2``, ``.onnx``, ``.plan``) through ``runtime.Encoder`` with its GPU
  token budget; a ``.pt2`` on CUDA named in ``--cuda-graphs`` is opened a second time, after every engine's plain
  figures, with CUDA graphs per length bucket, and its batch-1 latency and parity measured again, so both ways are
  in the same JSON.
For each: docs/hour and tokens/s at each ``--tokens`` and on the length mix, padding waste, batch-1 latency
p50/p99 at each ``--latency-tokens``, GPU memory, MFU against the peak of the math it runs on, and parity against
the fp32 baseline's vectors on the parity set (labelled with ``--weights``: random weights say nothing about
quality, only about the numerics). The fp32 baseline writes those vectors to ``--vectors``; later processes read
them. ``load_s`` of an engine excludes what the first ``.pt2`` of a process pays once (importing the compiler
and its check of the CPU's vector ISA): that is reported apart as ``first_load_extra``.
Results are written to ``--out`` after every figure, so a step killed at its time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.common import DOC_INSTRUCTION, environment, flop_model, write_json
from bench.speed.gpu_measure import GpuMemory, Workloads, card_for, latency, padding_waste_in_order, padding_waste_sorted, peak_tflops, throughput

BASELINES = ("fp32", "tf32", "bf16", "st-bf16")
REFERENCE_VECTORS = "reference-fp32.npy"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.speed.gpu_steps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file of the results")
    p.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint (tokenizer, FLOP count, eager baselines)")
    p.add_argument("--baselines", nargs="*", default=[], choices=BASELINES, help="eager baselines to measure, in this order")
    p.add_argument("--engine", action="append", default=[], metavar="NAME=PATH", help="an engine bundle to measure; repeatable")
    p.add_argument("--cuda-graphs", nargs="*", default=[], metavar="NAME",
                   help=".pt2 engines (by NAME) to measure again with CUDA graphs, after every engine's plain figures")
    p.add_argument("--vectors", type=Path, required=True, help="folder of the fp32 baseline's parity vectors (written or read)")
    p.add_argument("--weights", default="random weights", help="what the checkpoint's weights are, for the parity label")
    p.add_argument("--device", default="cuda", help="device to run on. Default: cuda")
    p.add_argument("--tokens", nargs="+", type=int, default=[128, 512], help="fixed tokens per text. Default: 128 512")
    p.add_argument("--latency-tokens", nargs="+", type=int, default=[32, 128], help="batch-1 latency lengths. Default: 32 128")
    p.add_argument("--docs-tokens", type=int, default=1 << 20, help="real tokens in each fixed-length pool. Default: 1048576")
    p.add_argument("--mix-docs", type=int, default=8192, help="items in the length-mix pool. Default: 8192")
    p.add_argument("--parity-rows", type=int, default=256, help="rows of the parity set. Default: 256")
    p.add_argument("--pass-seconds", type=float, default=0.75, help="target seconds of a timed pass. Default: 0.75")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (median reported). Default: 3")
    p.add_argument("--latency-iters", type=int, default=100, help="timed batch-1 calls (after 5 warm-up). Default: 100")
    p.add_argument("--latency-seconds", type=float, default=2.0, help="most seconds of timed batch-1 calls per length. Default: 2")
    p.add_argument("--batch-size", type=int, default=128, help="rows per batch of the eager baselines and the peer. Default: 128")
    return p.parse_args(argv)


class Session:
    """The report being written and what every contender shares (model facts, workloads, reference vectors)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from trainer.model import InstructorModel

        self.args = args
        self.model = InstructorModel.from_pretrained(args.checkpoint)
        self.fm = flop_model(self.model)
        self.gpu = gpu_name(args.device)
        t0 = time.perf_counter()
        self.work = Workloads.build(self.model, args.tokens, args.latency_tokens, args.docs_tokens, args.mix_docs, args.parity_rows)
        self.report: dict[str, Any] = {
            "device": args.device,
            "gpu": self.gpu,
            "card": card_for(self.gpu),
            "checkpoint": str(args.checkpoint),
            "weights": args.weights,
            "flop_model": self.fm.as_dict(),
            "workloads": {
                "cells": {k: {"items": len(v), "mean_tokens": round(float(np.mean(self.work.lengths[k])), 1)} for k, v in self.work.cells().items()},
                "mix": "bench/speed/length_mix.json (SciFact abstracts + CNN/DM reference summaries, half each)",
                "instruction": DOC_INSTRUCTION,
                "build_s": round(time.perf_counter() - t0, 2),
                "pass_seconds": args.pass_seconds,
                "repeats": args.repeats,
            },
            "environment": environment(),
            "results": {},
        }
        self.vectors_file = args.vectors / REFERENCE_VECTORS

    def save(self) -> None:
        write_json(self.args.out, self.report)

    def reference_vectors(self) -> np.ndarray | None:
        return np.load(self.vectors_file) if self.vectors_file.is_file() else None

    def measure(self, label: str, entry: dict[str, Any], run: Callable[[list[Any]], Any], padding: Callable[[str, int], float], peak: float | None, probe_rows: int) -> None:
        """Throughput cells, padding, latency and parity of one contender, saved after each figure."""
        a = self.args
        entry.setdefault("throughput", {})
        for cell, items in self.work.cells().items():
            row = throughput(run, items, self.work.lengths[cell], self.fm, peak, a.pass_seconds, a.repeats, probe_rows)
            row["padding_waste"] = round(padding(cell, row["docs"]), 4)
            entry["throughput"][cell] = row
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
            say(f"{label} {cell}: {row['docs_per_hour'] / 1e6:.3f} M docs/hour, {row['tokens_per_s']:.0f} tok/s, MFU {mfu}, padding {row['padding_waste']:.1%}")
            self.save()
        self.measure_latency(label, entry, run)
        vectors = np.asarray(run(self.work.parity), dtype=np.float32)
        entry["parity"] = self.parity(vectors)
        self.save()

    def measure_latency(self, label: str, entry: dict[str, Any], run: Callable[[list[Any]], Any]) -> None:
        entry.setdefault("batch1_latency", {})
        for n, one in self.work.latency.items():
            entry["batch1_latency"][str(n)] = lat = latency(lambda: run(one), self.args.latency_iters, self.args.latency_seconds)
            say(f"{label} batch-1 {n} tok: p50 {lat['p50_ms']:.2f} ms p99 {lat['p99_ms']:.2f} ms")
            self.save()

    def parity(self, vectors: np.ndarray) -> dict[str, Any]:
        from export.parity import compare

        reference = self.reference_vectors()
        if reference is None:
            return {"status": "no reference (the fp32 baseline did not run or failed)"}
        return {"vs": "fp32 eager (TF32 off)", "weights": self.args.weights, **compare(reference[: len(vectors)], vectors).as_dict()}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def gpu_name(device: str) -> str | None:
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.device(device))


def set_tf32(on: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def run_baselines(s: Session, names: list[str]) -> None:
    import torch

    a = s.args
    model = s.model
    fp32_memory: dict[str, Any] | None = None
    for name in [n for n in BASELINES if n in names]:
        precision = name.split("-")[-1]
        entry: dict[str, Any] = {"status": "measuring", "precision": precision, "batch_size": a.batch_size,
                                 "peak_tflops": peak_tflops(s.gpu, precision)}
        s.report["results"][name] = entry
        mem = GpuMemory(a.device)
        try:
            if name == "st-bf16":
                run, entry["what"], load_s = st_peer(s, mem)
                entry["load_s"] = load_s
                chars = {cell: np.array([len(DOC_INSTRUCTION + item[1]) for item in items]) for cell, items in s.work.cells().items()}

                def padding(cell: str, n: int) -> float:  # sentence-transformers sorts each call by characters
                    return padding_waste_in_order(s.work.lengths[cell][:n], np.argsort(-chars[cell][:n], kind="stable"), a.batch_size)
            else:
                set_tf32(name == "tf32")
                if name == "bf16":
                    model.to("cpu")  # the fp32 weights leave the device before bf16's load is measured
                t0 = time.perf_counter()
                mem.start()
                if name == "bf16":
                    model.to(torch.bfloat16)
                model.to(a.device)
                mem.loaded()
                entry["load_s"] = round(time.perf_counter() - t0, 2)
                entry["what"] = {"fp32": "trainer.InstructorModel.encode (= InstructorEmbedding 1.0.1), fp32, TF32 off",
                                 "tf32": "trainer.InstructorModel.encode, fp32 weights, TF32 matmuls",
                                 "bf16": "trainer.InstructorModel.encode after model.to(torch.bfloat16)"}[name]

                def run(items: list[Any]) -> Any:
                    return model.encode(items, batch_size=a.batch_size)

                def padding(cell: str, n: int) -> float:
                    return padding_waste_sorted(s.work.lengths[cell][:n], a.batch_size)

                if name == "fp32":
                    a.vectors.mkdir(parents=True, exist_ok=True)
                    np.save(s.vectors_file, np.asarray(run(s.work.parity), dtype=np.float32))
            s.measure(name, entry, run, padding, entry["peak_tflops"], a.batch_size)
            entry["memory"] = mem.report() if name != "tf32" or fp32_memory is None else {**fp32_memory, **peak_only(mem)}
            if name == "fp32":
                fp32_memory = entry["memory"]
            entry["status"] = "measured"
        except ImportError as exc:  # the peer's library is not on this machine: said so, not an error of ours
            entry.update(status="skipped", reason=f"{type(exc).__name__}: {exc}")
            say(f"{name}: skipped ({exc})")
        except Exception as exc:  # a failing contender is a result; the others are still measured
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
            say(f"{name}: {entry['error']}")
        finally:
            set_tf32(False)
            s.save()
    model.to("cpu")


def peak_only(mem: GpuMemory) -> dict[str, Any]:
    """tf32 runs on fp32's loaded weights: its own allocator peak, fp32's load figures."""
    if not mem.on:
        return {}
    return {"allocator_peak_mib": round(mem.torch.cuda.max_memory_allocated(mem.device) / 2**20), "load": "the fp32 baseline's weights"}


def st_peer(s: Session, mem: GpuMemory) -> tuple[Callable[[list[Any]], Any], str, float]:
    """sentence-transformers in bf16 on the device, as its docs load an INSTRUCTOR model."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling
    import sentence_transformers

    t0 = time.perf_counter()
    mem.start()
    st = SentenceTransformer(str(s.args.checkpoint), device=s.args.device, local_files_only=True, model_kwargs={"dtype": torch.bfloat16})
    for module in st:
        if isinstance(module, Pooling):
            module.include_prompt = False  # INSTRUCTOR: the instruction is not pooled
    mem.loaded()
    load_s = round(time.perf_counter() - t0, 2)

    def run(items: list[Any]) -> Any:
        prompts = {item[0] for item in items}
        if len(prompts) != 1:
            raise ValueError("sentence-transformers takes one prompt per encode call")
        return st.encode([item[1] for item in items], prompt=prompts.pop(), batch_size=s.args.batch_size, convert_to_numpy=True)

    return run, f"sentence-transformers {sentence_transformers.__version__}, bf16, prompt= one instruction per call, include_prompt=False", load_s


def first_load_extra(device: str) -> dict[str, float]:
    """What the first ``.pt2`` load of a process pays once, timed apart: importing the compiler package and its
    check of the CPU's vector ISA (it compiles and loads a probe per ISA; AOTInductor runs it on every load)."""
    t0 = time.perf_counter()
    import torch._inductor  # noqa: F401
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    t1 = time.perf_counter()
    pick_vec_isa()
    return {"import_inductor_s": round(t1 - t0, 2), "cpu_isa_check_s": round(time.perf_counter() - t1, 2)}


def run_engine(s: Session, label: str, path: str) -> None:
    from runtime import Encoder
    from runtime.bundle import EngineError
    from runtime.deps import MissingDependency

    a = s.args
    entry: dict[str, Any] = {"engine": path, "status": "measuring"}
    s.report["results"][label] = entry
    if Path(path).suffix == ".pt2":
        entry["first_load_extra"] = first_load_extra(a.device)
    mem = GpuMemory(a.device)
    mem.start()
    t0 = time.perf_counter()
    try:
        enc = Encoder(path, device=a.device)
    except (EngineError, MissingDependency, FileNotFoundError, ValueError) as exc:
        entry.update(status="skipped", reason=str(exc))
        say(f"{label}: skipped ({exc})")
        s.save()
        return
    mem.loaded()
    precision = enc.manifest.precision
    entry.update(backend=enc.backend.name, precision=precision, load_s=round(time.perf_counter() - t0, 2),
                 max_tokens=enc.max_tokens, peak_tflops=peak_tflops(s.gpu, precision))
    try:
        stats: dict[str, float] = {}

        def run(items: list[Any]) -> Any:
            out = enc.encode(items, batch_size=1024)
            stats[str(len(items))] = enc.last_stats.padding_waste
            return out

        s.measure(label, entry, run, lambda cell, n: stats[str(n)], entry["peak_tflops"], 512)
        entry["memory"] = mem.report()
        entry["status"] = "measured"
    except Exception as exc:  # a failing engine is a result; the others are still measured
        entry.update(status="error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        say(f"{label}: {entry['error']}")
    finally:
        enc.close()
        s.save()


def graphs_variant(s: Session, label: str, path: str, out: dict[str, Any]) -> None:
    """The same engine with CUDA graphs per length bucket: batch-1 latency and parity, into ``out`` (already in the
    report, so that each figure is saved as it comes)."""
    from runtime import Encoder

    if not (s.args.device.startswith("cuda") and s.gpu):
        out.update(status="skipped", reason="CUDA graphs need a CUDA device")
        return
    out["status"] = "measuring"
    try:
        t0 = time.perf_counter()
        with Encoder(path, device=s.args.device, cuda_graphs=True) as enc:
            out["load_s"] = round(time.perf_counter() - t0, 2)
            run = lambda items: enc.encode(items, batch_size=1)  # noqa: E731
            for one in s.work.latency.values():  # capture each bucket first: a failed capture falls back to plain
                run(one)  # calls, whose latency must not be reported as the graphs'
            if enc.backend.graph_error:
                raise RuntimeError(enc.backend.graph_error)
            s.measure_latency(f"{label} +graphs", out, run)
            out["parity"] = s.parity(np.asarray(enc.encode(s.work.parity[:64], batch_size=1), dtype=np.float32))
            out["graphs"] = enc.backend.graph_stats()
        out["status"] = "measured"
    except Exception as exc:
        out.update(status="error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        say(f"{label} +graphs: {out['error']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = Session(args)
    s.save()
    if args.baselines:
        run_baselines(s, args.baselines)
    engines = dict(spec.partition("=")[::2] for spec in args.engine)
    for label, path in engines.items():
        run_engine(s, label, path)
    for label in args.cuda_graphs:  # last: a capture that breaks the CUDA context cannot cost the plain figures
        entry = s.report["results"].get(label, {})
        if entry.get("status") == "measured" and Path(engines[label]).suffix == ".pt2":
            graphs_variant(s, label, engines[label], entry.setdefault("cuda_graphs", {}))
            s.save()
    s.save()
    say(f"wrote {args.out}")
    return 0 if all(r.get("status") != "error" for r in s.report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
