"""The PyTorch INSTRUCTOR model against the golden vectors of InstructorEmbedding 1.0.1, and its loader's errors."""

import json
import random

import numpy as np
import pytest
import torch

from trainer import InstructorModel
from trainer.checkpoint import CheckpointError


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_golden_vectors_any_order_and_batch(tiny_model, golden_inputs, golden_vectors, batch_size):
    order = list(range(len(golden_inputs)))
    random.Random(batch_size).shuffle(order)
    out = tiny_model.encode([golden_inputs[i] for i in order], batch_size=batch_size)
    restored = np.empty_like(out)
    restored[order] = out
    assert restored.dtype == np.float32 and restored.shape == golden_vectors.shape
    assert np.abs(restored - golden_vectors).max() <= 1e-5


@pytest.mark.parametrize("safe", [True, False])
def test_save_load_round_trip(tiny_model, golden_inputs, golden_vectors, tmp_path, safe):
    tiny_model.save(tmp_path / "m", safe_serialization=safe)
    weights = "model.safetensors" if safe else "pytorch_model.bin"
    assert (tmp_path / "m" / weights).is_file()
    assert (tmp_path / "m" / "2_Dense" / "pytorch_model.bin").is_file()  # what sentence-transformers 2.2.2 reads
    modules = json.loads((tmp_path / "m" / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense", "3_Normalize"]
    again = InstructorModel.from_pretrained(tmp_path / "m")
    assert np.abs(again.encode(golden_inputs) - golden_vectors).max() <= 1e-5


def test_encode_signature_forms(tiny_model, golden_inputs, golden_vectors):
    one = tiny_model.encode(golden_inputs[55])  # a plain string -> one vector
    assert one.shape == (32,) and np.abs(one - golden_vectors[55]).max() <= 1e-5
    t = tiny_model.encode(golden_inputs[:3], convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == (3, 32)
    lst = tiny_model.encode(golden_inputs[:3], convert_to_numpy=False)
    assert isinstance(lst, list) and len(lst) == 3
    tok = tiny_model.encode(golden_inputs[:2], output_value="token_embeddings")
    assert tok[0].shape[1] == 64
    assert np.allclose(np.linalg.norm(tiny_model.encode(golden_inputs[:5], normalize_embeddings=True), axis=1), 1)
    mixed = tiny_model.encode([golden_inputs[0], golden_inputs[57], golden_inputs[62]])
    assert np.abs(mixed - golden_vectors[[0, 57, 62]]).max() <= 1e-5


def test_upstream_trainer_layout(tiny_copy, golden_inputs, golden_vectors):
    modules = json.loads((tiny_copy / "modules.json").read_text())
    modules[0]["type"] = "InstructorEmbedding.instructor.INSTRUCTOR_Transformer"
    modules[1]["type"] = "InstructorEmbedding.instructor.INSTRUCTOR_Pooling"
    modules[1]["path"] = "1_INSTRUCTOR_Pooling"
    (tiny_copy / "1_Pooling").rename(tiny_copy / "1_INSTRUCTOR_Pooling")
    (tiny_copy / "modules.json").write_text(json.dumps(modules))
    model = InstructorModel.from_pretrained(tiny_copy)
    assert np.abs(model.encode(golden_inputs) - golden_vectors).max() <= 1e-5


def test_minilm_matches_sentence_transformers(minilm_model, minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "  padded  ", "", "x " * 400]
    ours = minilm_model.encode(sentences, batch_size=2)
    ref = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(sentences)
    assert np.abs(ours - ref).max() <= 1e-5
    assert ours[0] @ ours[1] == pytest.approx(0.7553, abs=1e-4)


def _break(folder, what):
    if what == "missing folder":
        return folder / "nope", "checkpoint folder not found"
    if what == "missing modules.json":
        (folder / "modules.json").unlink()
        return folder, "modules.json: file not found (not a sentence-transformers folder)"
    if what == "unknown module type":
        modules = json.loads((folder / "modules.json").read_text())
        modules[2]["type"] = "my_pkg.FancyHead"
        (folder / "modules.json").write_text(json.dumps(modules))
        return folder, "unknown module type 'my_pkg.FancyHead'"
    if what == "unsupported architecture":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (folder / "config.json").write_text(json.dumps(cfg))
        return folder, "unsupported architecture model_type='gpt2'"
    if what == "dense shape mismatch":
        cfg = json.loads((folder / "2_Dense" / "config.json").read_text())
        cfg["in_features"] = 128
        (folder / "2_Dense" / "config.json").write_text(json.dumps(cfg))
        return folder, "linear.weight has shape (32, 64), config.json says (32, 128)"
    if what == "dense vs encoder":
        state = torch.load(folder / "2_Dense" / "pytorch_model.bin", weights_only=True)
        torch.save({"linear.weight": torch.zeros(32, 48)}, folder / "2_Dense" / "pytorch_model.bin")
        cfg = json.loads((folder / "2_Dense" / "config.json").read_text())
        cfg["in_features"] = 48
        (folder / "2_Dense" / "config.json").write_text(json.dumps(cfg))
        assert state
        return folder, "Dense in_features=48 does not match the encoder's hidden size 64"
    if what == "no tokenizer":
        (folder / "tokenizer.json").unlink()
        return folder, "tokenizer.json: tokenizer file not found"
    if what == "missing dense folder":
        import shutil

        shutil.rmtree(folder / "2_Dense")
        return folder, "module folder '2_Dense' (dense) is missing"
    if what == "no weights":
        (folder / "pytorch_model.bin").unlink()
        return folder, "no encoder weights (expected model.safetensors or pytorch_model.bin)"
    if what == "corrupt weights":
        (folder / "pytorch_model.bin").write_bytes(b"garbage")
        return folder, "cannot load the t5 encoder weights"
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what",
    [
        "missing folder",
        "missing modules.json",
        "unknown module type",
        "unsupported architecture",
        "dense shape mismatch",
        "dense vs encoder",
        "no tokenizer",
        "missing dense folder",
        "no weights",
        "corrupt weights",
    ],
)
def test_bad_checkpoints_give_clear_errors(tiny_copy, what):
    folder, message = _break(tiny_copy, what)
    with pytest.raises((CheckpointError, FileNotFoundError)) as err:
        InstructorModel.from_pretrained(folder)
    assert message in str(err.value)
