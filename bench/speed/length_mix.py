"""A realistic length mix for throughput figures: token-length histograms of real corpora, and inputs drawn from them.

Texts of exactly 128 or 512 tokens need no padding, so they cannot show what length-sorted batching saves, nor
what docs/hour a real corpus gets. ``length_mix.json`` (beside this file) holds, per source, how many texts have
each token count: T5's tokenizer (``tests/fixtures/t5-tokenizer``), text tokens only (no instruction, no ``</s>``),
uncut. Only these counts are shipped, no text. The sources, from a data folder in the layout of
docs/evaluation.md:

- ``scifact-corpus``: the 5,183 SciFact abstracts, title + " " + text (long scientific documents; CC BY-NC 2.0);
- ``cnndm-references``: the 1,000 CNN/DailyMail reference summaries of the Billboard data (news passages of a few
  sentences, the length of MS MARCO passages; the instructor-embedding repository, Apache-2.0).

The mix takes each source with the weight in ``MIX`` (half documents, half passages). ``mix_items`` turns
sampled lengths into ``[instruction, text]`` items whose token count is the instruction's, the text's and
``</s>`` together, cut at the model's ``max_seq_length`` as the tokenizer would cut it.

CLI (rebuilds the JSON): ``python -m bench.speed.length_mix DATA_DIR [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

HISTOGRAM = Path(__file__).with_name("length_mix.json")
MIX = {"scifact-corpus": 0.5, "cnndm-references": 0.5}
SOURCES = {
    "scifact-corpus": {
        "file": "scifact/corpus.jsonl",
        "what": "SciFact abstracts (BEIR corpus), title + ' ' + text",
        "license": "CC BY-NC 2.0 (allenai/scifact)",
    },
    "cnndm-references": {
        "file": "billboard/cnndm/cnndm_references.jsonl",
        "what": "CNN/DailyMail reference summaries of the Billboard evaluation (every reference of every segment)",
        "license": "Apache-2.0 (xlang-ai/instructor-embedding, evaluation/text_evaluation/data)",
    },
}
# Words that are one T5 token each: text k words long is k tokens (bench.speed.latency.texts_of_length checks it).
WORDS = ("the", "of", "and", "to", "in", "is", "for", "on")


def read_texts(data_dir: Path, source: str) -> list[str]:
    """The texts of one source, as the histogram counts them."""
    path = data_dir / SOURCES[source]["file"]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if source == "scifact-corpus":
        return [(str(r.get("title") or "") + " " + r["text"]).strip() for r in rows]
    return [ref for r in rows for ref in r["refs"]]


def build_histogram(data_dir: Path, tokenizer_file: Path) -> dict[str, Any]:
    """Per source: text token count -> number of texts (T5 tokenizer, no special tokens)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    out: dict[str, Any] = {
        "unit": "text tokens per text: T5 tokenizer (tests/fixtures/t5-tokenizer), no instruction, no </s>, uncut",
        "mix": MIX,
        "sources": {},
    }
    for name, meta in SOURCES.items():
        lengths = [len(e.ids) for e in tok.encode_batch(read_texts(data_dir, name), add_special_tokens=False)]
        values, counts = np.unique(lengths, return_counts=True)
        out["sources"][name] = {
            **meta,
            "texts": len(lengths),
            "mean": round(float(np.mean(lengths)), 1),
            "p50": float(np.percentile(lengths, 50)),
            "p90": float(np.percentile(lengths, 90)),
            "counts": {str(int(v)): int(c) for v, c in zip(values, counts)},
        }
    return out


def load_histogram(path: Path = HISTOGRAM) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def sample_lengths(hist: dict[str, Any], n: int, seed: int = 0) -> np.ndarray:
    """``n`` text lengths drawn from the mix: a source by its weight, then a length by its count."""
    rng = np.random.default_rng(seed)
    names = sorted(hist["mix"])
    weights = np.array([hist["mix"][k] for k in names], dtype=np.float64)
    picks = rng.choice(len(names), size=n, p=weights / weights.sum())
    out = np.empty(n, dtype=np.int64)
    for i, name in enumerate(names):
        counts = hist["sources"][name]["counts"]
        values = np.array([int(k) for k in counts])
        probs = np.array(list(counts.values()), dtype=np.float64)
        mask = picks == i
        out[mask] = rng.choice(values, size=int(mask.sum()), p=probs / probs.sum())
    return out


def mix_items(tokenizer: Any, instruction: str, n: int, seed: int = 0, hist: dict[str, Any] | None = None) -> list[Any]:
    """``n`` ``[instruction, text]`` items with text lengths from the mix; a text past the model's window is cut
    where the tokenizer would cut it (so the items' token counts are the ones the engines see)."""
    lengths = sample_lengths(hist or load_histogram(), n, seed)
    overhead = int(tokenizer.encode([[instruction, WORDS[0]]]).lengths[0]) - 1  # instruction + </s>
    room = max(1, tokenizer.max_seq_length - overhead)
    items = []
    for i, k in enumerate(np.minimum(np.maximum(lengths, 1), room).tolist()):
        items.append([instruction, " ".join(WORDS[(i + j) % len(WORDS)] for j in range(k))])
    return items


def main(argv: list[str] | None = None) -> int:
    from bench.shapes import T5_TOKENIZER

    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.speed.length_mix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path, help="data folder (DATA_DIR) with scifact/ and billboard/cnndm/")
    p.add_argument("--out", type=Path, default=HISTOGRAM, help="histogram JSON to write. Default: the one shipped")
    args = p.parse_args(argv)
    hist = build_histogram(args.data_dir, T5_TOKENIZER / "tokenizer.json")
    args.out.write_text(json.dumps(hist, indent=1) + "\n", encoding="utf-8")
    for name, src in hist["sources"].items():
        print(f"{name}: {src['texts']} texts, mean {src['mean']} tokens, p50 {src['p50']:.0f}, p90 {src['p90']:.0f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
