"""Random-weight INSTRUCTOR checkpoints of the published shapes, and the fp16 overflow fixture.

``make_checkpoint(shape, folder, seed)`` writes a sentence-transformers folder in the hkunlp layout (T5 encoder,
mean pooling, Dense, Normalize) with the real T5 tokenizer and weights drawn by HF's T5 initializer from a seeded
generator: right for speed and for parity checks of the export, meaningless as embeddings.
``make_overflow_checkpoint(folder)`` is the tiny test model with every FF output projection (``wo``) scaled so
that FF outputs exceed fp16's 65504 in fp32: a naive fp16 graph gives inf/NaN on it.

CLI: ``python -m bench.shapes {tiny,base,large,overflow} FOLDER [--seed N]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
T5_TOKENIZER = REPO / "tests" / "fixtures" / "t5-tokenizer"
TINY_FIXTURE = REPO / "tests" / "fixtures" / "instructor-tiny"

# T5 encoder shapes (t5-base / t5-large = instructor-base / instructor-large), Dense -> 768 as hkunlp ships them.
SHAPES = {
    "tiny": {"d_model": 64, "num_layers": 2, "num_heads": 4, "d_kv": 16, "d_ff": 128, "dense_out": 32},
    "base": {"d_model": 768, "num_layers": 12, "num_heads": 12, "d_kv": 64, "d_ff": 3072, "dense_out": 768},
    "large": {"d_model": 1024, "num_layers": 24, "num_heads": 16, "d_kv": 64, "d_ff": 4096, "dense_out": 768},
}
MAX_SEQ_LENGTH = 512
# Power of two: scaling is exact in fp32, and lifts the tiny model's FF outputs (max ~3.3) to ~4e5 > 65504.
OVERFLOW_WO_SCALE = 2.0**17


def make_checkpoint(shape: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a random-weight INSTRUCTOR checkpoint of ``shape`` (tiny|base|large) to ``folder``."""
    import torch
    from transformers import T5Config, T5EncoderModel

    from runtime.tokenization import InstructionTokenizer
    from trainer.model import InstructorModel

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    dims = SHAPES[shape]
    config = T5Config(
        vocab_size=32128,
        d_model=dims["d_model"],
        d_kv=dims["d_kv"],
        d_ff=dims["d_ff"],
        num_layers=dims["num_layers"],
        num_heads=dims["num_heads"],
        feed_forward_proj="relu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    encoder = T5EncoderModel(config).eval()
    dense = torch.nn.Linear(dims["d_model"], dims["dense_out"], bias=False)
    tokenizer = InstructionTokenizer(T5_TOKENIZER / "tokenizer.json", MAX_SEQ_LENGTH, False)
    model = InstructorModel(encoder, tokenizer, dense, normalize=True)
    model.save(folder)
    return Path(folder)


def make_overflow_checkpoint(folder: str | Path, scale: float = OVERFLOW_WO_SCALE) -> Path:
    """The tiny fixture with every ``wo`` weight multiplied by ``scale`` (FF outputs beyond fp16's range)."""
    import torch

    from trainer.model import InstructorModel

    model = InstructorModel.from_pretrained(TINY_FIXTURE)
    with torch.no_grad():
        for block in model.auto_model.encoder.block:
            block.layer[-1].DenseReluDense.wo.weight.mul_(scale)
    model.save(folder)
    return Path(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m bench.shapes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=(*SHAPES, "overflow"), help="model shape, or the fp16 overflow fixture")
    p.add_argument("folder", type=Path, help="output checkpoint folder")
    p.add_argument("--seed", type=int, default=0, help="weight generator seed (random shapes). Default: 0")
    args = p.parse_args(argv)
    if args.shape == "overflow":
        make_overflow_checkpoint(args.folder)
    else:
        make_checkpoint(args.shape, args.folder, args.seed)
    print(f"wrote {args.shape} checkpoint to {args.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
