"""The prompt-retrieval tasks: upstream's shipped files (MultiRC answerability, GeoQuery) and a jsonl layout.

Each task fixes what upstream's script for it fixes: the text embedded and its instruction (``--add_prompt``),
the demonstration format, how a demonstration's tokens are counted, the budget, which embeddings are centred,
and the test/pool sampling (Python ``random`` seeded as upstream's ``set_seed``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from bench.quality.datafiles import DataError, MissingData, read_json, read_jsonl
from bench.quality.prompt_retrieval.select import Budget


@dataclass
class Example:
    """One annotated example: what is embedded, the demonstration it makes, the test input it makes, its answer."""

    id: str
    embed_text: str
    demo_input: str
    demo_output: str
    query: str  # the input when this example is the test one
    answer: str  # gold output (an option's text for option tasks)
    group: str  # what a good demonstration shares with the test (label; GeoQuery: SQL template), for diagnostics


@dataclass
class Task:
    name: str
    pool: list[Example]
    tests: list[Example]
    instruction: str | None  # upstream's instruction for this task (used with --instructions task)
    budget: Budget
    joined_cost: bool  # cost = tokens(input + output) (per-task scripts), else tokens(input) + tokens(output) (two_steps)
    center_tests: bool  # pool embeddings are always centred; upstream's main.py centres the test ones too
    prefix: str = ""  # text before the demonstrations, counted in the start cost
    options: list[str] = field(default_factory=list)  # answer options scored by an LM (empty: a generation task)
    source: str = ""  # upstream file whose rules this follows


def find_file(data_dir: Path, name: str) -> Path:
    """``data_dir/name`` or ``data_dir/prompt_retrieval/name``."""
    places = [data_dir / name, data_dir / "prompt_retrieval" / name]
    for path in places:
        if path.is_file():
            return path
    raise MissingData(f"{name}: not found in {' or '.join(str(p.parent) for p in places)}")


ANSWERABILITY_LABELS = {"Yes.": "True", "No.": "False"}


def answerability(data_dir: Path, seed: int = 0, n_tests: int = 256, n_pool: int = 3000) -> Task:
    """Natural-Instructions task050 (MultiRC answerability), as ``main_answerbility.py``: 256 tests, a 3000 pool."""
    path = find_file(data_dir, "multric_answerability.json")
    raw = read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("Instances"), list):
        raise DataError(f"{path}: expected a Natural-Instructions task file with an 'Instances' list")
    instances = raw["Instances"]
    if len(instances) < n_tests + n_pool:
        raise DataError(f"{path}: {len(instances)} instances, fewer than {n_tests} tests + {n_pool} pool")
    rng = random.Random(seed)
    test_ids = rng.sample(range(len(instances)), n_tests)
    pool_ids = rng.sample(list(set(range(len(instances))) - set(test_ids)), n_pool)

    def example(i: int, k: int) -> Example:
        inst = instances[k]
        parts = str(inst.get("input", "")).split("\nQuestion:")
        if len(parts) != 2 or not parts[0].startswith("Sentence:") or not inst.get("output"):
            raise DataError(f"{path}: Instances[{k}]: expected input 'Sentence: ...\\nQuestion: ...' and an output")
        sentence, question = parts[0].replace("Sentence:", "").strip(), parts[1].strip()
        label = inst["output"][0]
        if label not in ANSWERABILITY_LABELS:
            raise DataError(f"{path}: Instances[{k}]: output {label!r} is not one of {list(ANSWERABILITY_LABELS)}")
        text = f"{sentence}\n. Based on that information, can we know {question}\nanswer:"
        answer = ANSWERABILITY_LABELS[label]
        return Example(str(i), f"{sentence}\n{question}", text, answer, text, answer, answer)

    return Task(
        name="answerability",
        pool=[example(i, k) for i, k in enumerate(pool_ids)],
        tests=[example(i, k) for i, k in enumerate(test_ids)],
        instruction="Represent the Wikipedia sentence; Input: ",
        budget=Budget(max_tokens=1000),
        joined_cost=True,
        center_tests=False,
        options=list(ANSWERABILITY_LABELS.values()),
        source="evaluation/prompt_retrieval/main_answerbility.py",
    )


GEOQUERY_HEADER = "-- Using valid SQLite, answer the following questions for the tables provided above.\n"


def geoquery(data_dir: Path, seed: int = 0, n_tests: int = 256) -> Task:
    """GeoQuery text-to-SQL, as ``main_geo.py``: the whole train file is the pool, 256 sampled eval questions.

    Upstream also puts the database's schema and matching rows (from ``geoquery.sqlite``, not shipped) before the
    demonstrations; that block is absent here, so more of the 3800-token budget is left to demonstrations.
    """
    train_path, eval_path = find_file(data_dir, "geoquery_train.json"), find_file(data_dir, "geoquery_eval.json")

    def examples(path: Path) -> list[Example]:
        rows = read_json(path)
        out = []
        for k, row in enumerate(rows):
            missing = [f for f in ("question", "query", "seq_in", "sql_template") if f not in row]
            if missing:
                raise DataError(f"{path}: [{k}]: missing field(s) {missing}")
            q = row["question"]
            demo = (f"-- {q}\n", f"{row['query']}\n\n")
            out.append(Example(str(row.get("id", k)), row["seq_in"], *demo, f"-- {q}\nSELECT", row["query"], row["sql_template"]))
        return out

    pool, evals = examples(train_path), examples(eval_path)
    picked = random.Random(seed).sample(range(len(evals)), min(n_tests, len(evals)))
    return Task(
        name="geoquery",
        pool=pool,
        tests=[evals[i] for i in picked],
        instruction="Represent a Geography example; Input: ",
        budget=Budget(max_tokens=3800),
        joined_cost=True,
        center_tests=False,
        prefix=GEOQUERY_HEADER,
        source="evaluation/prompt_retrieval/main_geo.py",
    )


def jsonl_task(folder: Path, instruction: str | None, options: list[str] | None = None) -> Task:
    """``pool.jsonl`` and ``test.jsonl`` rows ``{"input", "output"}`` (optional ``"id"``, ``"embed"``: the text to
    embed, default the input), under ``two_steps.prompt_retrieval``'s rules as ``main.py`` runs them: budget 1000,
    examples over 250 tokens skipped, cosine-1 duplicates skipped, both sides centred."""

    def examples(path: Path) -> list[Example]:
        rows = read_jsonl(path, ("input", "output"))
        for lineno, row in enumerate(rows, 1):
            if not isinstance(row["input"], str) or not isinstance(row["output"], str):
                raise DataError(f"{path}: row {lineno}: input and output must be strings")
        return [
            Example(str(r.get("id", i)), str(r.get("embed", r["input"])), r["input"], r["output"], r["input"], r["output"], r["output"])
            for i, r in enumerate(rows)
        ]

    pool, tests = examples(folder / "pool.jsonl"), examples(folder / "test.jsonl")
    return Task(
        name=folder.name,
        pool=pool,
        tests=tests,
        instruction=instruction,
        budget=Budget(max_tokens=1000, per_example_cap=250, skip_identical=True),
        joined_cost=False,
        center_tests=True,
        options=options if options is not None else sorted({e.answer for e in pool}),
        source="evaluation/prompt_retrieval/two_steps.py + main.py",
    )
