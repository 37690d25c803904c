"""bench.quality.prompt_retrieval: selection = brute force; the pipeline with a small random-weight LM made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.quality.datafiles import DataError
from bench.quality.prompt_retrieval import tasks as task_defs
from bench.quality.prompt_retrieval.__main__ import main
from bench.quality.prompt_retrieval.select import Budget, cosine_scores, select

TINY = Path(__file__).parent / "fixtures" / "instructor-tiny"


def brute_force(test: np.ndarray, pool: np.ndarray, costs: list[int], start: int, budget: Budget) -> list[int]:
    """The longest run of the similarity ranking (after the skips) that fits, least similar first."""
    cos = [float(np.dot(test, p) / (np.linalg.norm(test) * np.linalg.norm(p))) for p in pool]
    ranked = sorted(range(len(pool)), key=lambda i: -cos[i])
    ranked = [i for i in ranked if not (budget.skip_identical and cos[i] >= 1 - 1e-6)]
    ranked = [i for i in ranked if budget.per_example_cap is None or costs[i] <= budget.per_example_cap]
    best = max((k for k in range(len(ranked) + 1) if start + sum(costs[i] for i in ranked[:k]) <= budget.max_tokens), default=0)
    return ranked[:best][::-1]


@pytest.mark.parametrize("budget", [Budget(60), Budget(200, per_example_cap=12), Budget(120, per_example_cap=15, skip_identical=True), Budget(3)])
def test_selection_equals_brute_force(budget):
    rng = np.random.default_rng(7)
    pool = rng.standard_normal((40, 16)).astype(np.float32)
    tests = rng.standard_normal((25, 16)).astype(np.float32)
    tests[0] = pool[5]  # an exact duplicate of a pool row: skipped only under skip_identical
    costs = rng.integers(1, 20, size=40)
    for test in tests:
        start = int(rng.integers(1, 10))
        got = select(cosine_scores(test, pool), costs, start, budget)
        assert got == brute_force(test, pool, costs.tolist(), start, budget)
    everything = select(cosine_scores(tests[0], pool), costs, 0, Budget(10_000, skip_identical=budget.skip_identical))
    assert len(everything) == 40 - budget.skip_identical
    assert (everything[-1] == 5) != budget.skip_identical  # the duplicate: most similar, last, unless skipped


def make_lm(folder: Path, corpus: list[str]) -> Path:
    """A byte-level BPE tokenizer trained on ``corpus`` and a 2-layer GPT-2 with seeded random weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=1024, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


POOL = [
    ("the sky is blue today", "True"), ("cats chase mice at night", "False"), ("rain falls from grey clouds", "True"),
    ("a dog barks at the mailman", "False"), ("the sun is bright and warm", "True"), ("birds sing in the morning", "False"),
    ("snow covers the mountain", "True"), ("fish swim in the river", "False"),
]
TESTS = [("clouds bring rain to the valley", "True"), ("a cat sleeps on the sofa", "False"), ("the sky at noon", "True")]


def write_jsonl_task(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "pool.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "input": f"{x}\nanswer:", "embed": x, "output": y}) + "\n" for i, (x, y) in enumerate(POOL)))
    (folder / "test.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "input": f"{x}\nanswer:", "embed": x, "output": y}) + "\n" for i, (x, y) in enumerate(TESTS)))
    return folder


def test_pipeline_with_a_small_random_lm(tmp_path):
    import torch

    from bench.quality.prompt_retrieval.lm import CausalLMScorer

    data = write_jsonl_task(tmp_path / "toy")
    lm_dir = make_lm(tmp_path / "lm", [f"{x}\nanswer:\n{y}\n\n\n" for x, y in POOL + TESTS])
    out = tmp_path / "out"
    args = ["--task", "jsonl", "--data-dir", str(data), "--engine", str(TINY), "--lm", str(lm_dir), "--instructions", "task", "none",
            "--instruction", "Represent the weather statement: ", "--output-dir", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["modes"]) == {"task", "none"}
    assert summary["modes"]["task"]["instruction"] == "Represent the weather statement: "
    assert 0.0 <= summary["modes"]["task"]["accuracy"] <= 1.0
    rows = [json.loads(line) for line in (out / "prompts-task.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["t0", "t1", "t2"]

    # the prompts: the selection rule on the embedder's own vectors (pool and tests centred: two_steps/main.py)
    from trainer import InstructorModel

    model = InstructorModel.from_pretrained(TINY)
    pool = model.encode([["Represent the weather statement: ", x] for x, _ in POOL]).astype(np.float32)
    tests = model.encode([["Represent the weather statement: ", x] for x, _ in TESTS]).astype(np.float32)
    pool, tests = pool - pool.mean(0), tests - tests.mean(0)
    scorer = CausalLMScorer(lm_dir)
    count = lambda text: len(scorer.tokenizer(text)["input_ids"])  # noqa: E731
    costs = [count(f"{x}\nanswer:") + count(y) for x, y in POOL]
    for row, test, (x, y) in zip(rows, tests, TESTS):
        expected = brute_force(test, pool, costs, count(f"{x}\nanswer:"), Budget(1000, 250, True))
        assert row["selected"] == [f"p{i}" for i in expected]
        assert row["cosines"] == sorted(row["cosines"])  # most similar last
        assert row["agreement"] == [POOL[i][1] == y for i in expected]

        # the LM's option losses: MetaICL's text layout, and each loss = HF's own mean cross-entropy of the option
        demos = [(f"{POOL[i][0]}\nanswer:", POOL[i][1]) for i in expected]
        seqs = scorer.sequences(demos, f"{x}\nanswer:", ["False", "True"])  # the pool's distinct outputs, sorted
        text = "".join(("" if k == 0 else "\n\n\n") + f"{d}\n{o}" for k, (d, o) in enumerate(demos)) + f"\n\n\n{x}\nanswer:"
        assert scorer.tokenizer.decode(seqs[0][0]) == text
        losses = []
        for ctx, opt in seqs:
            ids = torch.tensor([ctx + opt])
            labels = torch.tensor([[-100] * len(ctx) + opt])
            with torch.no_grad():
                losses.append(float(scorer.model(input_ids=ids, labels=labels).loss))
        assert row["option_losses"] == pytest.approx(losses, abs=1e-5)
        assert row["prediction"] == ["False", "True"][int(np.argmin(losses))]


def test_answerability_follows_upstream_sampling_and_format(tmp_path):
    instances = [
        {"id": f"task050-{i}", "input": f"Sentence: fact number {i}. \nQuestion: what is {i}?", "output": ["Yes." if i % 3 else "No."]}
        for i in range(40)
    ]
    (tmp_path / "prompt_retrieval").mkdir()
    (tmp_path / "prompt_retrieval" / "multric_answerability.json").write_text(json.dumps({"Definition": ["d"], "Instances": instances}))
    task = task_defs.answerability(tmp_path, seed=0, n_tests=5, n_pool=20)
    again = task_defs.answerability(tmp_path, seed=0, n_tests=5, n_pool=20)
    assert [e.embed_text for e in task.tests] == [e.embed_text for e in again.tests]
    assert not {e.embed_text for e in task.tests} & {e.embed_text for e in task.pool}
    first = task.pool[0]
    k = int(first.embed_text.split()[2].rstrip("."))
    assert first.embed_text == f"fact number {k}.\nwhat is {k}?"
    assert first.demo_input == f"fact number {k}.\n. Based on that information, can we know what is {k}?\nanswer:"
    assert first.demo_output == ("True" if k % 3 else "False") and task.options == ["True", "False"]
    assert task.instruction == "Represent the Wikipedia sentence; Input: " and task.budget == Budget(1000)
    assert task.joined_cost and not task.center_tests


def test_geoquery_follows_upstream_format(tmp_path):
    def rows(n: int, split: str) -> list[dict]:
        return [
            {"id": i, "question": f"{split} q{i}", "query": f"SELECT {i} ;", "seq_in": f"{split} q{i} | geoquery", "sql_template": f"T{i % 2}"}
            for i in range(n)
        ]

    (tmp_path / "geoquery_train.json").write_text(json.dumps(rows(6, "train")))
    (tmp_path / "geoquery_eval.json").write_text(json.dumps(rows(4, "eval")))
    task = task_defs.geoquery(tmp_path, n_tests=3)
    assert len(task.pool) == 6 and len(task.tests) == 3
    assert (task.pool[1].demo_input, task.pool[1].demo_output, task.pool[1].group) == ("-- train q1\n", "SELECT 1 ;\n\n", "T1")
    assert task.tests[0].query.startswith("-- eval q") and task.tests[0].query.endswith("\nSELECT")
    assert task.prefix == task_defs.GEOQUERY_HEADER and task.budget == Budget(3800) and not task.options
    (tmp_path / "geoquery_eval.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(DataError, match=r"geoquery_eval\.json: \[0\]: missing field\(s\) \['query', 'seq_in', 'sql_template'\]"):
        task_defs.geoquery(tmp_path)


def test_missing_files_and_tokenizer_are_named(tmp_path, capsys):
    with pytest.raises(DataError, match=r"multric_answerability\.json: not found in .* or .*prompt_retrieval"):
        task_defs.answerability(tmp_path)
    with pytest.raises(DataError, match=r"pool\.jsonl: file not found"):
        task_defs.jsonl_task(tmp_path, None)
    assert main(["--task", "geoquery", "--data-dir", str(tmp_path), "--engine", str(TINY)]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err
