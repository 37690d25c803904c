"""``python -m bench.speed.throughput``: docs/s of the runtime (each precision) against the reference path and against the
embedders a user would run instead (peers), all in the same run, on the same corpus and thread count.

Contenders per model:
- ``reference``: ``trainer.InstructorModel.encode`` (PyTorch fp32; equals ``InstructorEmbedding==1.0.1``);
- ``runtime-<precision>``: ``runtime.Encoder`` on an engine exported from that checkpoint (fp32, int8, ...;
  ``fp32.pt2`` etc.: the ``.pt2`` engine of that precision, compiled for the CPU; ``fp32-unfused`` etc.: the engine
  exported with ``--no-fuse-attention``, T5's attention as plain ops, the A/B of the fusion), with its node counts;
- ``runtime-auto``: ``runtime.Encoder`` on the ``--precision auto`` bundle as a user runs it (the engine it picks on
  this CPU, named in ``engine_choice``); ``runtime-auto/ENGINE``: one engine of that bundle (``openvino-bf16``, ...);
  either with ``-longest`` (``auto-longest``, ``auto/ENGINE-longest``): batches padded to their longest row, not to
  the engine's raced ``length_multiple`` (the A/B of the width rule);
- peers (``bench.speed.peers``, each in its own process, maybe its own venv): ``st-torch`` (sentence-transformers on
  PyTorch; an INSTRUCTOR instruction is its ``prompt``, left out of the pooling), ``st-onnx`` and ``st-onnx-qint8``
  (sentence-transformers ``backend="onnx"``: its Optimum export and its dynamic int8 export), ``fastembed`` (on that
  ONNX export, as a local folder), ``infinity`` (infinity_emb's Python engine, torch), ``st-openvino`` (its
  ``backend="openvino"`` as a user gets it: the CPU plugin may choose bf16), ``st-openvino-f32`` (pinned to f32) and
  ``st-openvino-qint8`` (its static NNCF int8). All load the checkpoint's local files; nothing comes from a model hub. The plain-text peers run on models without instructions (MiniLM).
Each contender encodes the corpus once to warm up; that pass's vectors are compared with the reference's (a peer
whose min cosine is below 0.999, 0.99 for int8, is timed but marked ``counted: false``). Then all contenders run in turn,
``--repeats`` rounds (the order rotates each round); the figure is the median round.
Reported: docs/s, real tokens/s, padding waste, ratio to the reference, agreement with the reference, useful GFLOP/s
(FLOPs of real tokens only: 2 x matmul weights x tokens + attention's QK^T and AV) and its share of the fp32 sgemm
peak (numpy) and of its own precision's peak (``peak``): the bf16 GEMM peak for bf16 engines (and peers OpenVINO
compiled for bf16), OpenVINO's or ONNX Runtime's int8 GEMM peak for int8 ones (``bench.speed.cpu_peaks``,
``bench.common.igemm_peak``), all measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.speed import peers
from bench.speed.cpu_peaks import bf16_gemm_peak, openvino_int8_gemm_peak
from bench.common import (
    MODELS,
    Workspace,
    environment,
    flop_model,
    igemm_peak,
    load_corpus,
    padded_tokens_in_order,
    padded_tokens_sorted,
    publish,
    sgemm_peak,
    timed,
    with_instruction,
)

PRECISIONS = ("fp32", "int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.speed.throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["base", "minilm"], choices=MODELS, help="model shapes (seeded random T5) and/or the real MiniLM. Default: base minilm")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), help="runtime engine precisions: PRECISION for the .onnx engine, PRECISION.pt2 for the .pt2 one (e.g. fp32.pt2), "
                   "PRECISION-unfused for the .onnx engine exported with --no-fuse-attention (T5: the A/B of the attention fusion); auto (the --precision auto bundle's pick), "
                   "auto/ENGINE (one of its engines), either with -longest (batches padded to the longest row, the A/B of the raced width rule). Default: fp32 int8")
    p.add_argument("--data", nargs="*", default=[], help="data folders (DATA_DIR, the layout of docs/evaluation.md) or .jsonl/.txt files; none: built-in corpus")
    p.add_argument("--docs", type=int, default=1000, help="texts in the corpus. Default: 1000")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported). Default: 5")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for every contender. Default: 32")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for every contender: torch, ONNX Runtime, each peer (0: all cores). Default: 0")
    p.add_argument("--peers", nargs="*", default=list(peers.PEERS), choices=peers.PEERS, metavar="PEER",
                   help=f"peers to run beside ours (none: --peers with no name). Choices and default: {' '.join(peers.PEERS)}")
    p.add_argument("--peer-python", action="append", default=[], metavar="NAME=PATH",
                   help="interpreter for a peer or a peer venv (st-onnx, fastembed, infinity, openvino); default: .venv-peers/NAME/bin/python "
                        "(bash bench/install_peers.sh), the project's own Python for st-torch. Repeatable")
    p.add_argument("--workdir", type=Path, default=Path("results/bench-work"), help="cache of checkpoints and engines. Default: results/bench-work")
    p.add_argument("--out", type=Path, default=Path("results/throughput.json"), help="JSON results; the PNG goes beside it. Default: results/throughput.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-weight shapes and of the corpus sample. Default: 0")
    return p.parse_args(argv)


@dataclass
class Contender:
    """One way to encode the corpus: ``run`` is what is timed, ``warm`` runs it once and returns its vectors."""

    name: str
    run: Callable[[], Any]
    warm: Callable[[], np.ndarray]
    precision: str = "fp32"
    padded: int | None = None  # positions computed, when the contender counts them itself
    info: dict[str, Any] = field(default_factory=dict)


def our_contenders(model_name: str, ws: Workspace, items: list[Any], args: argparse.Namespace, reference: Any) -> list[Contender]:
    """The reference path and the runtime at each precision the exporter can build."""
    from runtime import Encoder

    encode = partial(reference.encode, items, batch_size=args.batch_size)
    out = [Contender("reference", encode, encode)]
    for precision in args.precisions:
        if precision.partition("/")[0] in ("auto", "auto" + LONGEST):  # the --precision auto bundle: its pick, or one engine
            out += auto_contender(model_name, ws, items, args, precision)
            continue
        spec, dot, kind = precision.partition(".")  # "fp32.pt2": the .pt2 engine of that precision, for the CPU
        base, _, variant = spec.partition("-")  # "fp32-unfused": the export's --no-fuse-attention engine
        if variant not in ("", "unfused"):
            raise ValueError(f"--precisions {precision}: unknown variant {variant!r} (PRECISION[-unfused][.pt2])")
        engine = ws.engine(model_name, base, f".{kind}" if dot else ".onnx", fuse_attention=variant != "unfused")
        if engine is None:
            continue
        enc = Encoder(engine, intra_op_threads=args.threads) if engine.suffix == ".onnx" else Encoder(engine, device="cpu")
        run = partial(enc.encode, items, batch_size=args.batch_size)
        info = {"engine": str(engine), "encoder": enc, **({"graph": graph_nodes(engine)} if engine.suffix == ".onnx" else {})}
        out.append(Contender(f"runtime-{precision}", run, run, base, info=info))
    return out


LONGEST = "-longest"  # a precision suffix: pad to the longest row whatever the engine's raced width rule


def auto_contender(model_name: str, ws: Workspace, items: list[Any], args: argparse.Namespace, precision: str) -> list[Contender]:
    """``auto``: ``Encoder(bundle)`` as a user runs it (the engine its choice picks on this CPU); ``auto/ENGINE``:
    one engine of the bundle (``Encoder(bundle, precision=ENGINE)``); ``-longest`` after either: ``length_multiple=1``.
    An engine that cannot run here is skipped with the reason."""
    from runtime import Encoder
    from runtime.bundle import EngineError

    engine = ws.engine(model_name, "auto", ".onnx")
    if engine is None:
        return []
    try:
        longest = precision.endswith(LONGEST)
        which = precision.removesuffix(LONGEST).partition("/")[2] or "auto"
        enc = Encoder(engine, precision=which, intra_op_threads=args.threads, length_multiple=1 if longest else None)
    except (EngineError, ValueError) as exc:  # not in this bundle, or cannot run on this CPU
        ws.notes[f"{model_name} runtime-{precision}"] = str(exc)
        print(f"runtime-{precision}: skipped ({exc})", file=sys.stderr)
        return []
    choice = enc.engine_choice
    run = partial(enc.encode, items, batch_size=args.batch_size)
    info = {"engine": str(engine), "encoder": enc, "engine_choice": choice.as_dict(), "backend": choice.backend,
            "length_multiple": enc.length_multiple}
    return [Contender(f"runtime-{precision}", run, run, choice.precision, info=info)]


def peak_of(c: Contender, peaks: dict[str, float]) -> tuple[str, float]:
    """The GEMM peak a contender's share is taken of: the bf16 peak for bf16 engines (ours, or a peer that
    OpenVINO compiled for bf16), OpenVINO's or ONNX Runtime's int8 peak for int8 engines, else the sgemm peak."""
    backend = c.info.get("backend") or ("openvino" if "openvino" in c.name else "onnxruntime")
    compiled = str(c.info.get("inference_precision", ""))
    if c.precision == "int8":
        kind = "int8_openvino" if backend == "openvino" else "int8"
    elif c.precision == "bf16" or "bf16" in compiled or "bfloat16" in compiled:
        kind = "bf16"
    else:
        kind = "sgemm"
    if kind not in peaks:  # e.g. no OpenVINO here: the fp32 peak is the honest fallback, and the JSON says so
        kind = "sgemm"
    return kind, peaks[kind]


def graph_nodes(engine: Path) -> dict[str, Any]:
    """Node counts of an ``.onnx`` engine: all of them, per op type, and the exporter's plain graph they came from."""
    from export.optimize import op_counts
    from runtime.bundle import load_manifest

    ops = op_counts(engine)
    graph = load_manifest(engine, verify_engine=False).data.get("graph", {})
    plain = graph.get("fp32_graph", graph).get("nodes", {}).get("before")  # int8: the fp32 graph it quantized
    return {"nodes": sum(ops.values()), "plain_graph_nodes": plain, "ops": ops}


def peer_contenders(ckpt: Path, docs: list[str], prompt: str | None, args: argparse.Namespace, workdir: Path, skipped: dict[str, str]) -> list[tuple[Contender, peers.Peer]]:
    """Every peer of ``--peers`` that starts here; the others go to ``skipped`` with the reason."""
    out = []
    for name in args.peers:
        try:
            peer = peers.start(name, ckpt, docs, prompt, workdir, args.threads, args.batch_size, args.peer_python)
        except peers.PeerError as exc:
            skipped[name] = str(exc)
            print(f"peer {name}: skipped ({exc})", file=sys.stderr)
            continue
        out.append((Contender(name, peer.run, peer.vectors, peer.precision, info=peer.info), peer))
    return out


def bench_model(model_name: str, docs: list[str], args: argparse.Namespace, ws: Workspace, peaks: dict[str, float]) -> dict[str, Any]:
    import torch

    from trainer.model import InstructorModel

    ckpt = ws.checkpoint(model_name)
    reference = InstructorModel.from_pretrained(ckpt)
    torch.set_num_threads(args.threads)
    items = with_instruction(docs, reference.architecture)
    prompt = items[0][0] if items and isinstance(items[0], list) else None
    lengths = reference.tokenizer.encode(items).lengths
    flops = flop_model(reference).flops(lengths)
    skipped: dict[str, str] = {}
    runs = our_contenders(model_name, ws, items, args, reference)
    started = peer_contenders(ckpt, docs, prompt, args, ws.root / "peers" / model_name, skipped)
    try:
        agreements: dict[str, peers.Agreement] = {}
        ref_vectors = runs[0].warm()
        for c in runs[1:] + [c for c, _ in started]:  # warm-up, and every contender's vectors against the reference's
            agreements[c.name] = peers.agreement(ref_vectors, c.warm(), peers.THRESHOLDS[c.precision])
            if "encoder" in c.info:
                c.padded = c.info.pop("encoder").last_stats.padded_tokens
        runs += [c for c, _ in started]  # timed all the same; a peer that disagrees is marked as not counted
        times: dict[str, list[float]] = {c.name: [] for c in runs}
        for r in range(args.repeats):
            shift = r % len(runs)
            for c in runs[shift:] + runs[:shift]:
                times[c.name].append(timed(c.run))
    finally:
        for _, peer in started:
            peer.close()
    ref_median = statistics.median(times["reference"])
    results = {}
    for c in runs:
        med = statistics.median(times[c.name])
        padded = c.padded or (padded_tokens_in_order if c.name in peers.UNSORTED else padded_tokens_sorted)(lengths, args.batch_size)
        gflops = flops / med / 1e9
        results[c.name] = {
            "precision": c.precision,
            "seconds_median": med,
            "seconds_all": times[c.name],
            "docs_per_s": len(items) / med,
            "tokens_per_s": float(lengths.sum()) / med,
            "padding_waste": 1.0 - float(lengths.sum()) / padded,
            "ratio_to_reference": ref_median / med,
            "useful_gflops": gflops,
            "share_of_sgemm_peak": gflops / peaks["sgemm"],
            **({"share_of_int8_peak": gflops / peaks["int8"]} if c.precision == "int8" else {}),
            "peak": {"kind": peak_of(c, peaks)[0], "value": peak_of(c, peaks)[1], "share": gflops / peak_of(c, peaks)[1]},
            **({"engine_choice": c.info["engine_choice"], "length_multiple": c.info["length_multiple"]} if "engine_choice" in c.info else {}),
            **({"agreement": vars(agreements[c.name])} if c.name in agreements else {}),
            "counted": c.name not in agreements or agreements[c.name].passed,
            **({"peer": dict(c.info)} if c.name in args.peers else {}),
            **({"graph": c.info["graph"]} if "graph" in c.info else {}),
        }
    return {
        "checkpoint": str(ckpt),
        "architecture": reference.architecture,
        "flop_model": flop_model(reference).as_dict(),
        "docs": len(items),
        "tokens": int(lengths.sum()),
        "tokens_mean": float(lengths.mean()),
        "tokens_p50_p95_max": [float(np.percentile(lengths, 50)), float(np.percentile(lengths, 95)), int(lengths.max())],
        "useful_gflop_per_pass": flops / 1e9,
        "contenders": results,
        "peers_skipped": skipped,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.peer_python = peers.parse_peer_python(args.peer_python)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.threads = args.threads or os.cpu_count() or 1  # one explicit count for every contender
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    ws = Workspace(args.workdir, args.seed)
    docs, corpus_note = load_corpus(args.data, args.docs, args.seed)
    env = environment()
    sgemm, igemm = sgemm_peak(), igemm_peak(threads=args.threads)
    bf16, ov_int8 = bf16_gemm_peak(threads=args.threads), openvino_int8_gemm_peak(threads=args.threads)
    peaks = {"sgemm": sgemm["gflops_best"], "int8": igemm["gops_best"],
             **({"bf16": bf16["gflops_best"]} if bf16 else {}), **({"int8_openvino": ov_int8["gops_best"]} if ov_int8 else {})}
    print(f"bf16 GEMM peak: {bf16['gflops_best']:.1f} GFLOP/s ({bf16['how']}); " if bf16 else "bf16 GEMM peak: none (no native bf16 or no OpenVINO); ",
          f"OpenVINO int8 GEMM peak: {ov_int8['gops_best']:.1f} GOP/s ({ov_int8['kernel']})" if ov_int8 else "OpenVINO int8 GEMM peak: none (no OpenVINO)",
          file=sys.stderr)
    print(f"sgemm peak: {sgemm['gflops_best']:.1f} GFLOP/s (fp32, numpy {sgemm['n']}x{sgemm['n']}); int8 GEMM peak: "
          f"{igemm['gops_best']:.1f} GOP/s ({igemm['how']}; fp32 MatMul in the same harness {igemm['ort_sgemm_gflops_best']:.1f})", file=sys.stderr)
    report: dict[str, Any] = {"environment": env, "threads": args.threads, "sgemm": sgemm, "int8_gemm": igemm,
                              "bf16_gemm": bf16, "int8_gemm_openvino": ov_int8, "corpus": corpus_note,
                              "batch_size": args.batch_size, "repeats": args.repeats, "models": {}}
    for model_name in args.models:
        print(f"== {model_name}", file=sys.stderr)
        report["models"][model_name] = bench_model(model_name, docs, args, ws, peaks)
        for name, r in report["models"][model_name]["contenders"].items():
            cos = r.get("agreement", {}).get("min_cosine")
            print(
                f"{model_name:7s} {name:20s} {r['docs_per_s']:9.1f} docs/s  {r['tokens_per_s']:10.0f} tok/s  "
                f"x{r['ratio_to_reference']:.2f}  pad {r['padding_waste']:.1%}  {r['useful_gflops']:.1f} GFLOP/s "
                f"({r['peak']['share']:.0%} of the {r['peak']['kind']} peak)" + (f"  min cos {cos:.5f}" if cos is not None else "")
                + (f"  [{r['engine_choice']['engine']}]" if "engine_choice" in r else "")
                + (f"  {r['graph']['nodes']} nodes" if "graph" in r else "")
                + ("" if r["counted"] else "  NOT COUNTED: disagrees with the reference"),
                file=sys.stderr,
            )
    report["skipped"] = ws.notes
    from bench.plots import throughput_chart

    publish(report, args.out, throughput_chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
