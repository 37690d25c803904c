"""``python -m bench.quality.long_docs --engine E --data-dir DATA_DIR``: long documents and compact vectors on SciFact.

SciFact (BEIR layout under ``DATA_DIR/scifact``, test qrels), corpus documents ``(title + " " + text).strip()``,
queries plain or with ``--query-instruction`` / ``--doc-instruction``. The corpus is encoded twice by
``runtime.Encoder``, with ``long_text="truncate"`` (the reference) and ``"chunk"`` (``--chunk-overlap``,
token-weighted mean), each timed; then every corpus/query pair is searched exactly, in four vector types:

- ``float32``: cosine (dot product of unit vectors);
- ``int8``: int8 corpus and queries, both quantized with the corpus' per-dimension ranges, int32 dot product;
- ``binary``: packed sign bits, ranked by Hamming distance;
- ``binary+rescore``: the top ``--rescore-k`` (100) of ``binary`` re-ranked by the float32 query against the
  documents' bits (0/1), as sentence-transformers' ``semantic_search_*(rescore=True)`` does: no float32
  document is kept.

nDCG@10 comes from mteb's own retrieval metric (``calculate_retrieval_scores``, pytrec_eval) on the top 100 of
each search. Writes JSON, a Markdown table and a PNG (nDCG@10 against bytes per vector).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.common import environment, publish, timed
from bench.quality import cli

TOP = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser("python -m bench.quality.long_docs", __doc__)
    p.add_argument("--engine", required=True, help="engine bundle, e.g. all-MiniLM-L6-v2 fp32 .onnx (max_seq_length 256)")
    p.add_argument("--data-dir", type=Path, required=True, help="DATA_DIR holding scifact/ (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    p.add_argument("--query-instruction", help="instruction of every query (default: none, plain text)")
    p.add_argument("--doc-instruction", help="instruction of every document (default: none)")
    p.add_argument("--chunk-overlap", type=int, default=32, help="tokens shared by neighbouring chunks. Default: 32")
    p.add_argument("--rescore-k", type=int, default=100, help="binary candidates re-ranked in float32. Default: 100")
    p.add_argument("--repeats", type=int, default=1, help="timed encodings of the corpus per mode (median). Default: 1")
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch. Default: 32")
    p.add_argument("--out", type=Path, default=Path("results/long_docs.json"), help="JSON; .md and .png beside it")
    return p.parse_args(argv)


def with_instruction(texts: list[str], instruction: str | None) -> list[Any]:
    return texts if instruction is None else [[instruction, t] for t in texts]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores of each row, best first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def hamming_scores(queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """Minus the Hamming distance between packed bit codes (uint8 [n, dim / 8]): higher is closer."""
    table = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.int32)
    out = np.empty((len(queries), len(corpus)), dtype=np.int32)
    for i, q in enumerate(queries):
        out[i] = -table[np.bitwise_xor(corpus, q)].sum(axis=1)
    return out


def searches(q: np.ndarray, d: np.ndarray, rescore_k: int) -> dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]]:
    """Each vector type's search: (top indices, their scores) per query."""
    from runtime.output_dtype import calibration_ranges, quantize

    def float32() -> tuple[np.ndarray, np.ndarray]:
        s = q @ d.T
        idx = top_k(s, TOP)
        return idx, np.take_along_axis(s, idx, axis=1)

    def int8() -> tuple[np.ndarray, np.ndarray]:
        ranges = calibration_ranges(d)
        qi, di = quantize(q, "int8", ranges).astype(np.int32), quantize(d, "int8", ranges).astype(np.int32)
        s = (qi @ di.T).astype(np.float64)
        idx = top_k(s, TOP)
        return idx, np.take_along_axis(s, idx, axis=1)

    def binary() -> tuple[np.ndarray, np.ndarray]:
        s = hamming_scores(quantize(q, "ubinary"), quantize(d, "ubinary")).astype(np.float64)
        idx = top_k(s, TOP)
        return idx, np.take_along_axis(s, idx, axis=1)

    def rescored() -> tuple[np.ndarray, np.ndarray]:
        bits = quantize(d, "ubinary")
        candidates = top_k(hamming_scores(quantize(q, "ubinary"), bits), rescore_k)
        unpacked = np.unpackbits(bits[candidates], axis=-1)[..., : d.shape[1]].astype(np.float32)
        s = np.einsum("ij,ikj->ik", q, unpacked).astype(np.float64)
        order = np.argsort(-s, axis=1, kind="stable")
        return np.take_along_axis(candidates, order, axis=1), np.take_along_axis(s, order, axis=1)

    return {"float32": float32, "int8": int8, "binary": binary, "binary+rescore": rescored}


BYTES = {"float32": 4.0, "int8": 1.0, "binary": 1 / 8, "binary+rescore": 1 / 8}


def ndcg10(idx: np.ndarray, scores: np.ndarray, query_ids: list[str], doc_ids: list[str], qrels: dict) -> float:
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores

    results = {qid: {doc_ids[j]: float(s) for j, s in zip(row, srow)} for qid, row, srow in zip(query_ids, idx, scores)}
    return float(calculate_retrieval_scores(results, qrels, [10]).ndcg["NDCG@10"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: measure(args), "bench.quality.long_docs", args.debug)


def measure(args: argparse.Namespace) -> int:
    """The run of ``main``: SciFact's test split encoded truncated and chunked, each searched four ways."""
    from bench.quality.mteb.offline import load_beir
    from runtime import Encoder

    data = load_beir(args.data_dir / "scifact", "test")
    doc_ids = list(data["corpus"]["id"])
    docs = [f"{t} {x}".strip() for t, x in zip(data["corpus"]["title"], data["corpus"]["text"])]
    query_ids, queries = list(data["queries"]["id"]), list(data["queries"]["text"])
    report: dict[str, Any] = {"engine": args.engine, "environment": environment(), "corpus_docs": len(docs),
                              "queries": len(queries), "chunk_overlap": args.chunk_overlap, "rescore_k": args.rescore_k,
                              "modes": {}}
    rows = []
    for mode in ("truncate", "chunk"):
        with Encoder(args.engine, long_text=mode, chunk_overlap=args.chunk_overlap) as enc:
            q = enc.encode(with_instruction(queries, args.query_instruction), batch_size=args.batch_size)
            items = with_instruction(docs, args.doc_instruction)
            vectors: list[np.ndarray] = []
            seconds = [timed(lambda: vectors.append(enc.encode(items, batch_size=args.batch_size))) for _ in range(args.repeats)]
            d, stats = vectors[-1], enc.last_stats
            lengths = enc.tokenizer.encode(items, truncate=False).lengths
        info = {"encode_s_median": statistics.median(seconds), "encode_s_all": seconds, "docs_per_s": len(docs) / statistics.median(seconds),
                "engine_inputs": stats.chunks, "split_rows": stats.split_rows, "tokens_computed": stats.tokens,
                "max_seq_length": enc.max_seq_length, "docs_over_window": int((lengths > enc.max_seq_length).sum()),
                "variants": {}}
        for name, search in searches(q, d, args.rescore_k).items():
            found: list[tuple[np.ndarray, np.ndarray]] = []
            search_s = timed(lambda: found.append(search()))
            score = ndcg10(*found[0], query_ids, doc_ids, data["relevant_docs"])
            info["variants"][name] = {"ndcg_at_10": score, "bytes_per_vector": BYTES[name] * d.shape[1], "search_s": search_s}
            rows.append((mode, name, score, BYTES[name] * d.shape[1], info["encode_s_median"], search_s))
            print(f"{mode:9s} {name:15s} nDCG@10 {score:.4f}  {BYTES[name] * d.shape[1]:6.0f} B/vector", file=sys.stderr)
        report["modes"][mode] = info
    table = ["| long text | vectors | nDCG@10 | bytes/vector | corpus encode s | search s |", "|---|---|---|---|---|---|"]
    table += [f"| {m} | {n} | {s:.4f} | {b:g} | {e:.1f} | {t:.2f} |" for m, n, s, b, e, t in rows]
    report["table_md"] = "\n".join(table)
    from bench.plots import quality_vs_size_chart

    publish(report, args.out, quality_vs_size_chart)
    args.out.with_suffix(".md").write_text(report["table_md"] + "\n", encoding="utf-8")
    print(report["table_md"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
