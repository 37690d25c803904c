"""The GPU check (bench/gpu_check.sh, bench.speed.gpu_check and its steps) without a GPU: the budget and the shares
of the cores, a step killed at its limit keeping what it wrote, the bundle's limits, the summary and its goals, the
peak table, the length mix, nvidia-smi's snapshot, and (slow) the whole dry run on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bench.speed import gpu_check
from bench.speed.gpu_check import MAX_BUNDLE_FILE, Runner, Step, cut_limit, shares, summarize, write_bundle
from bench.speed.gpu_measure import PEAKS, card_for, padding_waste_in_order, padding_waste_sorted, peak_tflops

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=2400)


def test_usage_needs_a_folder_and_a_bundle(tmp_path):
    res = run_script(cwd=tmp_path)
    assert res.returncode == 2 and "usage: bench/gpu_check.sh" in res.stderr
    res = run_script("out", cwd=tmp_path)
    assert res.returncode == 2 and "--bundle" in res.stderr


def test_bundle_inside_dir_is_refused(tmp_path):
    res = run_script("--dry-run", "out", "--bundle", "out/bundle", cwd=tmp_path)
    assert res.returncode == 2 and "must not be DIR, inside it or hold it" in res.stderr


def test_compile_threads_are_shared_out():
    assert shares(16, {"build-bf16.pt2": 8, "build-fp16.pt2": 5, "parity": 3}) == {"build-bf16.pt2": 8, "build-fp16.pt2": 5, "parity": 3}
    two = shares(2, {"a": 8, "b": 5, "c": 3})
    assert two == {"a": 1, "b": 1, "c": 1}  # never 0: every compiling step gets a worker
    assert sum(shares(12, {"a": 8, "b": 5, "c": 3}).values()) == 12


def test_limit_is_cut_to_the_budget_left_after_the_reserve():
    assert cut_limit(240, left=400, reserve=80) == 240
    assert cut_limit(240, left=300, reserve=80) == 220
    assert cut_limit(240, left=50, reserve=80) == 0


def test_plan_orders_baselines_before_builds_and_bf16_before_fp16(tmp_path):
    plan = gpu_check.plan(tmp_path, dry_run=False, python="python3", cores=16)
    assert [s.name for s in plan.make_ckpt] == ["checkpoint"] and plan.budget == gpu_check.BUDGET_S
    assert plan.baselines[0].cmd[plan.baselines[0].cmd.index("--baselines") + 1 :][:4] == ["fp32", "tf32", "bf16", "st-bf16"]
    names = [s.name for s in plan.builds]
    assert names.index("build-bf16.pt2") < names.index("build-fp16.pt2")
    threads = {s.name: int(s.env["TORCHINDUCTOR_COMPILE_THREADS"]) for s in plan.builds if s.env}
    assert threads == {"build-bf16.pt2": 8, "build-fp16.pt2": 5, "parity": 3}
    built = {"build-bf16.pt2": {"status": "passed"}, "build-fp16.pt2": {"status": "error"}, "build-fp16.onnx": {"status": "skipped"}}
    measures = plan.measures(built)
    assert [s.name for s in measures] == ["measure-engines"] and "pt2-bf16=" in " ".join(measures[0].cmd)
    assert "pt2-fp16=" not in " ".join(measures[0].cmd) and measures[0].cmd[measures[0].cmd.index("--cuda-graphs") + 1] == "pt2-bf16"
    assert plan.measures({}) == []  # nothing built: nothing to measure
    # the worst case: every step runs to its (cut) limit; the run still ends within the budget, and the reserves
    # cut the builds, not the bf16 engine's measurement after them
    every = plan.measures({f"build-{n}": {"status": "passed"} for n in ("bf16.pt2", "fp16.pt2")})
    t, cut = 30.0, {}
    for group in ([s] for s in [*plan.make_ckpt, *plan.baselines]), [plan.builds], ([s] for s in every):
        for steps in group:
            limits = [cut_limit(s.limit, plan.budget - t, s.reserve) for s in steps]
            cut.update({s.name: lim for s, lim in zip(steps, limits)})
            t += max(limits)
    assert t <= plan.budget and cut["baselines"] == plan.baselines[0].limit and cut["measure-engines"] >= 90, cut


class StepClock:
    """A clock that stands still until ``trigger`` exists, then jumps past every limit: the step's kill does not
    depend on how fast the machine runs it."""

    def __init__(self, trigger: Path) -> None:
        self.trigger = trigger

    def __call__(self) -> float:
        return 10_000.0 if self.trigger.exists() else 0.0


def test_a_step_past_its_limit_is_killed_and_keeps_what_it_wrote(tmp_path):
    partial = tmp_path / "step.json"
    clock = StepClock(partial)
    runner = Runner(tmp_path, budget=100, on_step=lambda: None, clock=lambda: 0.0)
    runner.clock = clock  # the budget is read at the start (0), the limit checked on the jumping clock
    code = f"import json, time; open({str(partial)!r}, 'w').write(json.dumps({{'measured': 1}})); time.sleep(600)"
    [rec] = runner.run([Step("slow", 20, [sys.executable, "-c", code])], dict(os.environ))
    assert rec["timed_out"] is True and rec["rc"] != 0
    assert json.loads(partial.read_text()) == {"measured": 1}
    assert json.loads((tmp_path / "steps.jsonl").read_text().splitlines()[0])["step"] == "slow"


def test_a_step_with_no_budget_left_is_skipped(tmp_path):
    runner = Runner(tmp_path, budget=100, on_step=lambda: None, clock=lambda: 0.0)
    assert runner.run([Step("late", 60, ["true"], reserve=98)], dict(os.environ)) == []
    assert json.loads((tmp_path / "steps.jsonl").read_text()) == {"step": "late", "rc": None, "seconds": 0, "skipped": "time budget spent"}


def test_bundle_stays_within_what_comes_back(tmp_path):
    out, bundle = tmp_path / "dir", tmp_path / "bundle"
    (out / "logs").mkdir(parents=True)
    (out / "artifacts").mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):  # 10 logs of 4 MiB of noise: 40 MiB that gzip cannot shrink
        (out / "logs" / f"step{i}.log").write_bytes(rng.bytes(4 * 2**20)[:-8] + b"LAST-END")
    (out / "artifacts" / "big.pt2").write_bytes(b"\0" * 2**20)  # artifacts never enter the bundle
    (out / "steps.jsonl").write_text(json.dumps({"step": "env", "rc": 0, "seconds": 1}) + "\n")
    (out / "env.json").write_text(json.dumps({"gpu": None, "dry_run": True}))
    write_bundle(out, bundle)
    files = sorted(p.name for p in bundle.iterdir())
    assert files == sorted(gpu_check.BUNDLE_FILES) and len(files) <= 8
    assert all((bundle / f).stat().st_size < MAX_BUNDLE_FILE for f in files)
    with tarfile.open(bundle / "logs.tgz") as tar:
        names = tar.getnames()
        assert "logs/step0.log" in names and "env.json" in names and not any(n.endswith(".pt2") for n in names)
        assert tar.extractfile("logs/step9.log").read().endswith(b"LAST-END")  # the end of a log is what is kept
    merged = json.loads((bundle / "gpu_check.json").read_text())
    assert merged["steps"][0]["step"] == "env" and merged["env"]["dry_run"] is True


def contender(docs_mix: float, p50_32: float | None = None, precision: str = "bf16") -> dict:
    return {"status": "measured", "precision": precision, "throughput": {c: {"docs_per_hour": docs_mix * k} for c, k in (("128", 4), ("512", 1), ("mix", 2))},
            "batch1_latency": {"32": {"p50_ms": p50_32, "p99_ms": p50_32}} if p50_32 else {}}


def test_summary_ratios_and_goals():
    merged = {"steps": [], "baselines": {"results": {"bf16": contender(1e6), "st-bf16": contender(2e6)}},
              "measure-engines": {"results": {"pt2-bf16": {**contender(3e6, 4.0), "cuda_graphs": {"batch1_latency": {"32": {"p50_ms": 2.5}}}}}}}
    s = summarize(merged)
    assert s["ratios"]["pt2-bf16"]["vs_bf16_mix"] == pytest.approx(3.0) and s["ratios"]["pt2-bf16"]["vs_st-bf16_mix"] == pytest.approx(1.5)
    goals = s["goals"]
    assert goals["pt2-bf16 docs/hour at 128 tokens >= 20M"] == {"value": 12e6, "target": 20e6, "met": False}
    assert goals["pt2-bf16 x eager bf16 on the mix >= 2.5"]["met"] is True
    assert goals["pt2-bf16 x sentence-transformers bf16 on the mix >= 2"]["met"] is False
    assert goals["pt2-bf16 batch-1 p50 at 32 tokens <= 3 ms (best of with/without CUDA graphs)"]["value"] == 2.5
    empty = summarize({"steps": []})["goals"]
    assert all(g["met"] is None for g in empty.values())  # nothing measured: no goal is called met or missed


@pytest.mark.parametrize(
    ("name", "card"),
    [("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
     ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA A100-SXM4-80GB", "A100"),
     ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("NVIDIA GeForce RTX 4090", None), (None, None)],
)
def test_card_by_cuda_name(name, card):
    assert card_for(name) == card


def test_peak_is_the_precision_used():
    assert peak_tflops("NVIDIA H200 NVL", "bf16") == 835.5  # not the SXM H200's 989.4
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == 66.9  # the TF32-off reference: CUDA cores, not tensor cores
    assert peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp16") == peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert all(p["fp32"] < p["tf32"] < p["bf16"] for p in PEAKS.values())


def test_padding_waste_of_each_batching_rule():
    lengths = np.array([10, 100, 10, 100])
    assert padding_waste_sorted(lengths, 2) == 0.0  # sorted: [100, 100], [10, 10]
    assert padding_waste_in_order(lengths, np.arange(4), 2) == pytest.approx(1 - 220 / 400)  # in order: each pair padded to 100


def test_length_mix_histogram_and_items():
    from bench.speed.length_mix import HISTOGRAM, MIX, load_histogram, mix_items, sample_lengths
    from trainer.model import InstructorModel
    from tests.conftest import TINY

    hist = load_histogram()
    assert set(hist["mix"]) == set(MIX) == set(hist["sources"])
    sci = hist["sources"]["scifact-corpus"]
    assert sum(sci["counts"].values()) == sci["texts"] == 5183 and "CC BY-NC" in sci["license"]
    assert HISTOGRAM.stat().st_size < 64 * 1024  # counts only, no text
    a, b = sample_lengths(hist, 2000, seed=3), sample_lengths(hist, 2000, seed=3)
    assert (a == b).all() and 100 < a.mean() < 300  # half ~370-token abstracts, half ~52-token summaries
    model = InstructorModel.from_pretrained(TINY)
    items = mix_items(model.tokenizer, "Represent the document for retrieval: ", 300, seed=3, hist=hist)
    got = model.tokenizer.encode(items).lengths
    overhead = int(model.tokenizer.encode([["Represent the document for retrieval: ", "the"]]).lengths[0]) - 1
    want = np.minimum(sample_lengths(hist, 300, seed=3) + overhead, model.max_seq_length)
    assert (got == want).all()


def test_nvidia_smi_snapshot_falls_back_to_the_older_field_name(tmp_path, monkeypatch):
    from bench.speed.gpu_env import nvidia_smi

    monkeypatch.setenv("PATH", str(tmp_path))
    assert nvidia_smi() == {"available": False, "why": "nvidia-smi is not on PATH"}
    fake = tmp_path / "nvidia-smi"  # a driver that knows only clocks_throttle_reasons
    fake.write_text('#!/bin/sh\ncase "$1" in *clocks_event_reasons*) echo "Field is not a valid field"; exit 2;; esac\n'
                    'echo "NVIDIA H100 80GB HBM3, 580.1, P0, 1980, 1980, 2619, 2619, 120.5, 700.00, 35, 1, 81559, 0, 0x0"\n')
    fake.chmod(0o755)
    snap = nvidia_smi()
    assert snap["available"] and snap["gpus"][0]["clocks.sm"] == "1980" and snap["gpus"][0]["power.limit"] == "700.00"
    assert snap["gpus"][0]["clocks_throttle_reasons.active"] == "0x0"


@pytest.mark.slow
def test_dry_run_writes_the_bundle(tmp_path):
    res = run_script("--dry-run", "out", "--bundle", "bundle", cwd=tmp_path)  # relative folders: from the caller's
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    bundle = tmp_path / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == sorted(gpu_check.BUNDLE_FILES)
    assert all(p.stat().st_size < MAX_BUNDLE_FILE for p in bundle.iterdir())
    report = json.loads((bundle / "gpu_check.json").read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert {"env", "baselines", "build-bf16.pt2", "build-fp16.pt2", "parity", "build-fp16.onnx", "build-fp16.plan",
            "measure-engines"} <= set(steps)
    assert all(s["rc"] == 0 and s["cpu_s"] >= 0 for s in steps.values()), steps
    assert report["env"]["dry_run"] is True and report["env"]["hub"]["HF_HUB_OFFLINE"] == "1"

    base = report["baselines"]["results"]
    assert list(base) == ["fp32", "tf32", "bf16", "st-bf16"] and all(r["status"] == "measured" for r in base.values())
    for r in base.values():
        assert r["throughput"]["mix"]["docs_per_s"] > 0 and r["throughput"]["mix"]["padding_waste"] >= 0
        assert r["batch1_latency"]["32"]["p50_ms"] > 0 and r["parity"]["weights"].startswith("random weights")
    assert base["bf16"]["parity"]["min_cosine"] > 0.99
    engines = report["parity"]["engines"]
    assert list(engines)[0] == "overflow-naive-fp16"  # the no-compile contrast first
    assert engines["tiny-fp16.pt2"]["golden"]["passed"]
    for name in ("build-bf16.pt2", "build-fp16.pt2", "build-fp16.onnx"):
        assert report[name]["status"] == "passed", report[name]
    assert report["build-fp16.pt2"]["compile_threads"] == "1" or os.cpu_count() > 2
    measured = report["measure-engines"]["results"]
    assert list(measured) == ["pt2-bf16", "pt2-fp16", "onnx-fp16"] and all(r["status"] == "measured" for r in measured.values())
    pt2 = measured["pt2-bf16"]
    assert pt2["status"] == "measured" and pt2["precision"] == "bf16" and set(pt2["first_load_extra"]) == {"import_inductor_s", "cpu_isa_check_s"}
    assert pt2["parity"]["min_cosine"] > 0.99 and pt2["cuda_graphs"]["status"] == "skipped"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert report["build-fp16.plan"]["status"] == "skipped" and "tensorrt" in report["build-fp16.plan"]["reason"]
    summary = report["summary"]
    assert summary["ratios"]["pt2-bf16"]["vs_bf16_mix"] > 0 and "pt2-fp16" in summary["contenders"]
    assert "| pt2-bf16 (bf16, measured) |" in (bundle / "gpu_check.md").read_text()
