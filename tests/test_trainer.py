"""The trainer's loss against the upstream golden values, GradCache exactness, data validation and batching."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer import InstructorModel
from trainer.batching import BatchPlan, local_slice
from trainer.data import DataError, MediIndex, RowReader
from trainer.features import TrainingFeaturizer
from trainer.step import contrastive_step

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "instructor-tiny"
GOLDEN = FIXTURES / "golden"
MEDI = FIXTURES / "medi" / "medi-tiny.json"


@pytest.fixture
def model() -> InstructorModel:
    return InstructorModel.from_pretrained(TINY)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, rows, temperature=0.1, chunk=None, grad_cache=False, pad64=True):
    model.zero_grad(set_to_none=True)
    feats = TrainingFeaturizer(model.tokenizer, 64, pad_to_max_length=pad64)(rows, chunk)
    loss = contrastive_step(model, feats, temperature, torch.device("cpu"), grad_cache=grad_cache)
    return loss, _grads(model)


def _assert_grads_close(got: dict, ref: dict, rel: float = 1e-5) -> None:
    assert got.keys() == ref.keys()
    scale = max(float(g.abs().max()) for g in ref.values())
    worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    assert worst <= rel * scale, f"max grad difference {worst:.3e} vs scale {scale:.3e}"


# --- golden loss -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", ["0.1", "0.01"])
def test_golden_loss_and_gradients(model, temperature):
    """Upstream train.py's loss on loss_batch.json: dropout off (the reference ran the model in eval mode), fp32."""
    ref = json.loads((GOLDEN / "loss.json").read_text())["by_temperature"][temperature]
    rows = json.loads((GOLDEN / "loss_batch.json").read_text())
    model.eval()
    loss, grads = _step(model, rows, float(temperature))
    assert loss == pytest.approx(ref["loss"], rel=1e-5)
    dense = grads["dense.weight"]
    assert float(dense.norm()) == pytest.approx(ref["dense_weight_grad_norm"], rel=1e-5)
    first = np.asarray(ref["dense_weight_grad_first_row"])
    assert np.abs(dense[0].numpy() - first).max() <= 1e-5 * np.abs(first).max()
    assert float(grads["auto_model.shared.weight"].norm()) == pytest.approx(ref["embedding_grad_norm"], rel=1e-5)


def test_golden_needs_upstream_training_count_and_no_dropout(model):
    """What the golden pins down: counting on I.strip() (the inference rule) or dropout on both miss it."""
    ref = json.loads((GOLDEN / "loss.json").read_text())["by_temperature"]["0.1"]["loss"]
    rows = json.loads((GOLDEN / "loss_batch.json").read_text())
    feats = TrainingFeaturizer(model.tokenizer, 64, pad_to_max_length=True)
    pairs = [r[s] for s in ("query", "pos", "neg") for r in rows]
    encoded = feats.encode(pairs)
    training = encoded.instruction_count
    inference = feats.tok.with_strip(True).instruction_counts(p[0] for p in pairs)  # counted on I.strip()
    assert (training == inference + 1).all()  # the trailing "▁" of "...: "
    model.eval()
    with torch.no_grad():
        encoded.instruction_count = inference
        stripped = feats.tok.pad(encoded, 64)
        emb = model(**{k: torch.from_numpy(v) for k, v in stripped.items()})
        from trainer.loss import instructor_loss

        q, p, n = emb.split(len(rows))
        assert abs(float(instructor_loss(q, p, n, 0.1)) - ref) > 1e-3
    model.train()
    torch.manual_seed(0)
    loss, _ = _step(model, rows)
    assert abs(loss - ref) > 1e-3


# --- GradCache ---------------------------------------------------------------------------------------------------


def _medi_rows(task: str, n: int) -> list[dict]:
    return [r for r in json.loads(MEDI.read_text(encoding="utf-8")) if r["task_name"] == task][:n]


@pytest.mark.parametrize("chunk", [1, 5, 12])
def test_grad_cache_equals_direct(model, chunk):
    rows = _medi_rows("tiny_caption_entailment", 8)
    model.eval()
    ref_loss, ref = _step(model, rows, chunk=None)
    loss, got = _step(model, rows, chunk=chunk, grad_cache=True, pad64=False)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    _assert_grads_close(got, ref)


def test_grad_cache_replays_dropout(model):
    """With dropout on, the cached-gradient pass must see the very masks of the no-grad pass."""
    rows = _medi_rows("tiny_question_duplicates", 6)
    model.train()
    feats = TrainingFeaturizer(model.tokenizer, 64)(rows, 4)
    torch.manual_seed(3)
    model.zero_grad(set_to_none=True)
    emb = torch.cat([model(**c) for c in feats])  # the same chunks, same RNG order, with a graph
    from trainer.loss import global_loss

    ref_loss = global_loss(emb, 0.1)
    ref_loss.backward()
    ref = _grads(model)
    torch.manual_seed(3)
    model.zero_grad(set_to_none=True)
    loss = contrastive_step(model, feats, 0.1, torch.device("cpu"), grad_cache=True)
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    _assert_grads_close(_grads(model), ref)


# --- data --------------------------------------------------------------------------------------------------------


def test_index_reads_every_row_exactly(tmp_path):
    rows = json.loads(MEDI.read_text(encoding="utf-8"))
    index = MediIndex.build(MEDI, show_progress=False)
    assert len(index) == len(rows) and index.task_keys == [
        "tiny_caption_entailment",
        "tiny_question_duplicates",
        "tiny_bank_intent",
    ]
    reader = RowReader(index)
    assert [reader[i] for i in range(len(rows))] == rows  # non-ASCII text: byte offsets, not characters
    reader.close()
    # JSON lines with integer task ids, and a compact JSON list, index the same rows
    jsonl = tmp_path / "medi.jsonl"
    ids = {k: i for i, k in enumerate(index.task_keys)}
    with_ids = [{**{k: v for k, v in r.items() if k != "task_name"}, "task_id": ids[r["task_name"]]} for r in rows]
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in with_ids), encoding="utf-8")
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(rows, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    for path, expected in ((jsonl, with_ids), (compact, rows)):
        other = MediIndex.build(path, show_progress=False)
        assert (other.task == index.task).all()
        reader = RowReader(other)
        assert [reader[i] for i in range(len(rows))] == expected
        reader.close()


def test_index_cache_is_reused_and_invalidated(tmp_path):
    data = tmp_path / "medi.json"
    data.write_bytes(MEDI.read_bytes())
    MediIndex.build(data, show_progress=False).save(tmp_path / "ix.npz")
    cached = MediIndex.load(tmp_path / "ix.npz", data)
    assert cached is not None and len(cached) == 34
    data.write_bytes(MEDI.read_bytes().replace(b"tiny_bank_intent", b"tiny_bank_intenT"))
    os.utime(data, ns=(1, 1))
    assert MediIndex.load(tmp_path / "ix.npz", data) is None
    assert MediIndex.load(tmp_path / "missing.npz", data) is None


GOOD = {"query": ["Represent a: ", "x"], "pos": ["Represent b: ", "y"], "neg": ["Represent b: ", "z"], "task_name": "t"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({k: v for k, v in GOOD.items() if k != "pos"}, "row 1: missing field 'pos'"),
        ({**GOOD, "neg": "just text"}, "row 1: field 'neg' must be an [instruction, text] pair"),
        ({**GOOD, "query": ["only one"]}, "row 1: field 'query' must be an [instruction, text] pair"),
        ({**GOOD, "query": ["Represent: ", 3]}, "row 1: field 'query' must be an [instruction, text] pair"),
        ({**GOOD, "task_name": "  "}, "row 1: field 'task_name' is empty"),
        ({k: v for k, v in GOOD.items() if k != "task_name"}, "row 1: missing field 'task_name' (or 'task_id')"),
        ({**{k: v for k, v in GOOD.items() if k != "task_name"}, "task_id": "7"}, "row 1: field 'task_id' must be an integer"),
        (["not", "an", "object"], "row 1: expected an object"),
    ],
)
def test_validation_names_row_and_field(tmp_path, bad, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([GOOD, bad, GOOD]))
    with pytest.raises(DataError) as err:
        MediIndex.build(path, show_progress=False)
    assert str(path) in str(err.value) and message in str(err.value)


def test_validation_jsonl_names_line_and_broken_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "task_name": ""}) + "\n")
    with pytest.raises(DataError, match=r"line 2: field 'task_name' is empty"):
        MediIndex.build(path, show_progress=False)
    broken = tmp_path / "broken.json"
    broken.write_text("[" + json.dumps(GOOD) + ", {\"query\": [}]")
    with pytest.raises(DataError, match=r"row 1: invalid JSON"):
        MediIndex.build(broken, show_progress=False)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([GOOD, {**{k: v for k, v in GOOD.items() if k != "task_name"}, "task_id": 1}]))
    with pytest.raises(DataError, match="mix 'task_name'"):
        MediIndex.build(mixed, show_progress=False)


# --- batching ----------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    tasks=st.lists(st.integers(0, 4), min_size=1, max_size=120),
    per_device=st.integers(1, 6),
    processes=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**31 - 1),
    epoch=st.integers(0, 3),
)
def test_every_global_batch_is_single_task(tasks, per_device, processes, seed, epoch):
    task = np.asarray(tasks)
    rows_of_task = tuple(np.flatnonzero(task == t) for t in np.unique(task))
    plan = BatchPlan(rows_of_task, per_device * processes, seed)
    batches = plan.epoch(epoch)
    assert len(batches) == plan.steps_per_epoch
    seen = np.concatenate(batches) if batches else np.zeros(0, int)
    assert len(set(seen.tolist())) == len(seen)  # no row twice in an epoch
    for batch in batches:
        assert len(batch) == per_device * processes and len(set(task[batch])) == 1
        parts = [local_slice(batch, r, processes) for r in range(processes)]
        assert all(len(p) == per_device for p in parts)
        assert np.array_equal(np.concatenate(parts), batch)  # the processes split the global batch, same task
    for t, rows in enumerate(rows_of_task):  # only incomplete chunks are dropped
        assert len(rows) - int(np.isin(seen, rows).sum()) == len(rows) % (per_device * processes)
    again = BatchPlan(rows_of_task, per_device * processes, seed).epoch(epoch)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))  # deterministic given the seed


def test_epoch_zero_takes_contiguous_chunks_and_later_epochs_reshuffle():
    rows_of_task = (np.arange(0, 8), np.arange(8, 12))
    plan = BatchPlan(rows_of_task, 4, 42)
    first = sorted(b.tolist() for b in plan.epoch(0))
    assert first == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert sorted(sorted(b.tolist()) for b in plan.epoch(1)) != first  # new in-batch negatives
