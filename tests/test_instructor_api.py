"""InstructorEmbedding 1.0.1's ``INSTRUCTOR`` class here: ``trainer.INSTRUCTOR`` (PyTorch) and ``runtime.INSTRUCTOR``
(engine), each ``encode`` argument against the golden vectors of the reference."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime import INSTRUCTOR as EngineINSTRUCTOR
from runtime.bundle import EngineError
from tests.conftest import TINY, assert_torch_free
from trainer import INSTRUCTOR
from trainer.checkpoint import CheckpointError

TOL = 1e-5


@pytest.fixture(scope="module")
def model() -> INSTRUCTOR:
    return INSTRUCTOR(str(TINY), device="cpu")


@pytest.fixture(scope="module")
def unnormalized_dir(tmp_path_factory) -> Path:
    """The tiny checkpoint without its Normalize module, as a checkpoint without one is published."""
    folder = tmp_path_factory.mktemp("no-normalize") / "tiny"
    shutil.copytree(TINY, folder)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    return folder


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# -- trainer.INSTRUCTOR -----------------------------------------------------------------------------------------


def test_defaults_give_the_golden_vectors(model, golden_inputs, golden_vectors):
    out = model.encode(golden_inputs)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == golden_vectors.shape
    assert np.abs(out - golden_vectors).max() <= TOL
    assert model.device == torch.device("cpu") and model.get_sentence_embedding_dimension() == 32


def test_convert_options_and_single_string(model, golden_inputs, golden_vectors):
    stacked = model.encode(golden_inputs[:5], convert_to_tensor=True, convert_to_numpy=True)  # tensor wins, as in 1.0.1
    assert isinstance(stacked, torch.Tensor) and stacked.shape == (5, 32)
    assert np.abs(stacked.numpy() - golden_vectors[:5]).max() <= TOL
    listed = model.encode(golden_inputs[:5], convert_to_numpy=False)
    assert isinstance(listed, list) and all(isinstance(t, torch.Tensor) and t.shape == (32,) for t in listed)
    one = model.encode(golden_inputs[55])
    assert one.shape == (32,) and np.abs(one - golden_vectors[55]).max() <= TOL
    assert isinstance(model.encode(golden_inputs[55], convert_to_tensor=True), torch.Tensor)
    assert model.encode(golden_inputs[:3], batch_size=1, show_progress_bar=True).shape == (3, 32)
    assert not model.encode(golden_inputs[:2], convert_to_tensor=True).requires_grad


def test_normalize_embeddings_false_is_unnormalized_without_a_normalize_module(unnormalized_dir, golden_inputs, golden_vectors):
    raw_model = INSTRUCTOR(unnormalized_dir, device="cpu")
    raw = raw_model.encode(golden_inputs, normalize_embeddings=False)
    norms = np.linalg.norm(raw, axis=1)
    assert np.abs(norms - 1).min() > 1e-3  # no row is a unit vector (input 25, ['a', 'b'], pools nothing: zero in 1.0.1 too)
    assert np.abs(_unit(raw) - golden_vectors).max() <= TOL  # the direction is the reference's
    unit = raw_model.encode(golden_inputs, normalize_embeddings=True)
    assert np.abs(unit - golden_vectors).max() <= TOL


def test_token_embeddings_are_per_token_and_pool_to_the_golden_vectors(model, golden_inputs, golden_vectors, golden_tokens):
    tokens = model.encode(golden_inputs, output_value="token_embeddings", batch_size=7)
    assert isinstance(tokens, list) and len(tokens) == len(golden_inputs)
    for i, (states, ref) in enumerate(zip(tokens, golden_tokens)):
        n, excluded = len(ref["ids"]), ref["excluded"]
        if excluded >= n:  # input 25 (['a', 'b']): every token is the instruction's; 1.0.1 then keeps the first state
            assert states.shape == (1, 64) and not golden_vectors[i].any()
            continue
        assert isinstance(states, torch.Tensor) and states.shape == (n, 64), i  # every token up to the last pooled one
        with torch.no_grad():
            vector = torch.nn.functional.normalize(model.dense(states[excluded:].mean(dim=0, keepdim=True)), dim=1)[0]
        assert np.abs(vector.numpy() - golden_vectors[i]).max() <= TOL, i


def test_output_value_none_gives_every_feature(model, golden_inputs, golden_vectors, golden_tokens):
    rows = model.encode(golden_inputs[:4], output_value=None)
    assert all(set(r) == {"input_ids", "attention_mask", "context_masks", "token_embeddings", "sentence_embedding"} for r in rows)
    for i, row in enumerate(rows):
        ref = golden_tokens[i]
        assert row["input_ids"].tolist() == ref["ids"] and int(row["context_masks"]) == ref["excluded"]
        assert row["attention_mask"].tolist() == [0] * ref["excluded"] + [1] * (len(ref["ids"]) - ref["excluded"])
        assert np.abs(row["sentence_embedding"].numpy() - golden_vectors[i]).max() <= TOL
    with pytest.raises(ValueError, match="output_value must be one of"):
        model.encode(golden_inputs[:1], output_value="cls")


def test_max_seq_length_is_settable(golden_inputs, golden_vectors):
    model = INSTRUCTOR(TINY, device="cpu")
    assert model.max_seq_length == model.get_max_seq_length() == 512
    long = max(range(len(golden_inputs)), key=lambda i: len(json.dumps(golden_inputs[i])))  # the >512-token text
    model.max_seq_length = 8
    assert model.tokenize([golden_inputs[long]])["input_ids"].shape == (1, 8)
    assert np.abs(model.encode([golden_inputs[long]])[0] - golden_vectors[long]).max() > 1e-3
    model.max_seq_length = 512
    assert np.abs(model.encode(golden_inputs) - golden_vectors).max() <= TOL
    with pytest.raises(ValueError, match="max_seq_length must be an int"):
        model.max_seq_length = 0


def test_quantize_dynamic_as_the_original_readme(model, golden_inputs, golden_vectors):
    qmodel = torch.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    out = qmodel.encode(golden_inputs[:8])
    assert out.shape == (8, 32) and np.all(np.sum(out * golden_vectors[:8], axis=1) > 0.9)
    assert np.abs(model.encode(golden_inputs[:8]) - golden_vectors[:8]).max() <= TOL  # the original is untouched


def test_hub_names_resolve_from_the_originals_caches_only(tmp_path, monkeypatch, golden_inputs, golden_vectors):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("SENTENCE_TRANSFORMERS_HOME", raising=False)
    st_cache = tmp_path / "st"
    shutil.copytree(TINY, st_cache / "hkunlp_instructor-tiny")  # sentence-transformers 2.2.2's cache layout
    from_st = INSTRUCTOR("hkunlp/instructor-tiny", device="cpu", cache_folder=st_cache)
    assert np.abs(from_st.encode(golden_inputs[:4]) - golden_vectors[:4]).max() <= TOL
    snapshot = tmp_path / "hf" / "hub" / "models--hkunlp--instructor-tiny" / "snapshots" / "0123abc"
    shutil.copytree(TINY, snapshot)  # the Hugging Face hub cache layout
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    assert INSTRUCTOR("hkunlp/instructor-tiny", device="cpu").source_dir == snapshot
    with pytest.raises(CheckpointError, match=r"hkunlp/instructor-xl: no such folder.*no model hub is contacted.*Pass a local folder"):
        INSTRUCTOR("hkunlp/instructor-xl")


def test_the_originals_other_methods_name_this_projects_way(model):
    with pytest.raises(AttributeError, match=r"trainer\.INSTRUCTOR\.fit is not offered here: train with `python -m trainer`"):
        model.fit
    with pytest.raises(AttributeError, match="runtime.encode"):
        model.encode_multi_process
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        model.no_such_thing


# -- runtime.INSTRUCTOR -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_model(tiny_engine) -> EngineINSTRUCTOR:
    with EngineINSTRUCTOR(tiny_engine, device="cpu") as m:
        yield m


def test_engine_defaults_give_the_golden_vectors(engine_model, golden_inputs, golden_vectors):
    out = engine_model.encode(golden_inputs, batch_size=7)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert np.abs(out - golden_vectors).max() <= TOL
    one = engine_model.encode(golden_inputs[56])
    assert one.shape == (32,) and np.abs(one - golden_vectors[56]).max() <= TOL
    assert engine_model.device == "cpu" and engine_model.get_sentence_embedding_dimension() == 32


def test_engine_tensors_need_torch_and_say_so(engine_model, golden_inputs, golden_vectors, monkeypatch):
    stacked = engine_model.encode(golden_inputs[:3], convert_to_tensor=True)
    assert isinstance(stacked, torch.Tensor) and np.abs(stacked.numpy() - golden_vectors[:3]).max() <= TOL
    listed = engine_model.encode(golden_inputs[:3], convert_to_numpy=False)
    assert isinstance(listed, list) and len(listed) == 3 and isinstance(listed[0], torch.Tensor)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ImportError, match=r"convert_to_tensor=True returns torch tensors and needs torch.*convert_to_numpy=True"):
        engine_model.encode(golden_inputs[:3], convert_to_tensor=True)
    assert engine_model.encode(golden_inputs[:3]).shape == (3, 32)


def test_engine_token_embeddings_name_the_pytorch_class(engine_model, golden_inputs):
    for value in ("token_embeddings", None):
        with pytest.raises(ValueError, match=r"sentence embeddings only.*from trainer import INSTRUCTOR"):
            engine_model.encode(golden_inputs[:2], output_value=value)


def test_engine_max_seq_length_is_settable_up_to_the_exported_length(tiny_engine, golden_inputs, golden_vectors):
    with EngineINSTRUCTOR(tiny_engine, device="cpu") as m:
        assert m.max_seq_length == 512
        m.max_seq_length = 8
        assert m.tokenize(golden_inputs[:2])["input_ids"].shape[1] <= 8
        reference = INSTRUCTOR(TINY, device="cpu")
        reference.max_seq_length = 8
        assert np.abs(m.encode(golden_inputs) - reference.encode(golden_inputs)).max() <= TOL
        with pytest.raises(ValueError, match="exported and checked for at most 512 tokens"):
            m.max_seq_length = 513


def test_engine_normalize_embeddings_false_is_unnormalized_without_a_normalize_module(unnormalized_dir, tmp_path, golden_inputs, golden_vectors):
    from export.build import export_bundle

    engine = tmp_path / "raw.onnx"
    export_bundle(unnormalized_dir, engine)
    with EngineINSTRUCTOR(engine, device="cpu") as m:
        raw = m.encode(golden_inputs)
        assert np.abs(np.linalg.norm(raw, axis=1) - 1).min() > 1e-3
        assert np.abs(raw - INSTRUCTOR(unnormalized_dir, device="cpu").encode(golden_inputs)).max() <= TOL
        assert np.abs(m.encode(golden_inputs, normalize_embeddings=True) - golden_vectors).max() <= TOL


def test_engine_refuses_folders_and_hub_names_with_the_way(tmp_path):
    for name in (str(TINY), "hkunlp/instructor-large"):
        with pytest.raises(EngineError, match=r"python -m export .*from trainer import INSTRUCTOR"):
            EngineINSTRUCTOR(name)


def test_engine_class_never_imports_torch(tiny_engine):
    assert_torch_free(
        f"from runtime import INSTRUCTOR\nm = INSTRUCTOR({str(tiny_engine)!r}, device='cpu')\n"
        "v = m.encode([['Represent the title: ', 'a b c'], 'plain'], normalize_embeddings=True)\n"
        "assert v.shape == (2, 32)\n"
        "try:\n    m.fit\nexcept AttributeError as e:\n    assert 'python -m trainer' in str(e)\n"
    )
