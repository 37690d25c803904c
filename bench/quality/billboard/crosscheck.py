"""``python -m bench.quality.billboard.crosscheck``: Billboard figures from a direct implementation of upstream's formula.

Upstream ``evaluation/text_evaluation/main.py``: embed the references file line by line (refs flattened),
reshape to ``[segments, refs, dim]``; embed the THumB file's ``hyp`` in file order and reshape to
``[segments, systems, dim]`` (the file is grouped by segment in the references' order); L2-normalize both,
``bmm`` and max over references; ``scipy.stats.pearsonr(human_score, sims)``. Here the embeddings come from
sentence-transformers on the same weights (``prompt=`` with ``Pooling(include_prompt=False)`` for an
instruction, which is INSTRUCTOR's pooling for BERT-family models such as all-MiniLM-L6-v2). With ``--engine``
the project's own ``bench.quality.billboard`` figure is computed in the same run and the difference reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import pearsonr

from bench.quality.billboard.data import FOLDERS, read_task, task_files
from bench.quality.billboard.score import TABLES, evaluate_task, instruction_for
from bench.common import write_json
from bench.quality import cli
from bench.quality.datafiles import read_jsonl


def sentence_transformer(model_dir: Path, instructed: bool) -> Any:
    """The checkpoint in sentence-transformers; instructed runs leave the prompt out of the mean (BERT family only)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    if instructed:
        if model[0].auto_model.config.model_type in ("t5", "mt5"):
            raise ValueError(
                f"{model_dir}: sentence-transformers joins and counts prompts differently from INSTRUCTOR on T5 "
                "tokenizers; cross-check T5 models with --instructions-for none"
            )
        model[1].include_prompt = False
    return model


def upstream_pearson(model: Any, ref_path: Path, thumb_path: Path, instruction: str | None, batch_size: int = 32) -> float:
    """Pearson of upstream's formula, step by step as upstream's main.py does it, on ``model``'s embeddings."""
    import torch

    refs = [r["refs"] for r in read_jsonl(ref_path)]
    thumb = read_jsonl(thumb_path)
    kwargs = {"batch_size": batch_size, "prompt": instruction} if instruction is not None else {"batch_size": batch_size}
    ref_emb = np.asarray(model.encode([t for seg in refs for t in seg], **kwargs)).reshape(len(refs), -1, model.get_sentence_embedding_dimension())
    hyp_emb = np.asarray(model.encode([row["hyp"] for row in thumb], **kwargs)).reshape(len(refs), -1, ref_emb.shape[-1])
    hyps = torch.nn.functional.normalize(torch.Tensor(hyp_emb), p=2.0, dim=-1)
    refs_t = torch.nn.functional.normalize(torch.Tensor(ref_emb), p=2.0, dim=-1)
    sims = torch.bmm(hyps, refs_t.transpose(2, 1)).max(dim=-1)[0]
    return float(pearsonr(np.array([row["human_score"] for row in thumb]), np.array(sims).reshape(-1)).statistic)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser("python -m bench.quality.billboard.crosscheck", __doc__)
    p.add_argument("--model", type=Path, required=True, help="sentence-transformers checkpoint folder (the engine's source weights)")
    p.add_argument("--engine", help="the project's engine file or checkpoint to score in the same run (optional)")
    p.add_argument("--data-dir", type=Path, required=True, help="DATA_DIR, as for python -m bench.quality.billboard")
    p.add_argument("--tasks", nargs="+", default=["mscoco", "cnndm"], choices=list(FOLDERS), help="Default: mscoco cnndm")
    p.add_argument("--instructions-for", choices=TABLES, default="none", help="instruction table or 'none'. Default: none")
    p.add_argument("--out", type=Path, default=Path("results/billboard/crosscheck.json"), help="JSON output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return cli.run(lambda: crosscheck(args), "bench.quality.billboard.crosscheck", args.debug)


def crosscheck(args: argparse.Namespace) -> int:
    """The run of ``main``: both scorings of each task, side by side."""
    model = sentence_transformer(args.model, args.instructions_for != "none")
    encoder = None
    if args.engine:
        from bench.quality.encoders import load_encoder

        encoder = load_encoder(args.engine)[0]
    rows = {}
    for name in args.tasks:
        instruction = instruction_for(args.instructions_for, name)
        ref_path, thumb_path = task_files(args.data_dir, name)
        row: dict[str, Any] = {"instruction": instruction, "sentence_transformers_upstream_formula": upstream_pearson(model, ref_path, thumb_path, instruction)}
        if encoder is not None:
            row["bench_billboard"] = evaluate_task(encoder, read_task(args.data_dir, name), instruction)["pearson"]
            row["abs_diff"] = abs(row["bench_billboard"] - row["sentence_transformers_upstream_formula"])
        rows[name] = row
        print(f"{name}: {json.dumps(row)}", file=sys.stderr)
    report = {"model": str(args.model), "engine": args.engine, "instructions_for": args.instructions_for, "tasks": rows}
    write_json(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
