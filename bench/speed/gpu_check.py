"""``python -m bench.speed.gpu_check [--dry-run] DIR --bundle OUT``: the GPU check's steps, their time limits and
the bundle of results it writes (``bench/gpu_check.sh`` runs this; docs/benchmarks.md, "GPU check").

GPU time is scarce: the check gets one run of under 8 minutes, and must yield figures even if every compile
fails. So the eager baselines run first, the builds after them, and each step:
- runs in its own process group with a time limit, cut to what is left of the budget minus what the steps after
  it need (``reserve``), and is killed (TERM, then KILL) at its limit; its JSON, written as it measures, stays;
- is recorded in ``steps.jsonl`` with its exit code, wall seconds, CPU seconds (its process tree's) and limit;
- is followed by a new bundle in OUT: ``gpu_check.json`` (every step's JSON merged, with a summary), ``gpu_check.md``
  (the summary as tables) and ``logs.tgz`` (logs, per-step JSON and engine manifests, each log cut to its last
  ``LOG_TAIL`` bytes): three files, each under 16 MiB, rewritten whole after every step.
Steps that run at the same time (the builds and ``parity``) share the cores: each gets its share as
``TORCHINDUCTOR_COMPILE_THREADS`` (and ``OMP_NUM_THREADS``), instead of each starting a pool of every core.
Artifacts (checkpoints, engines, compiler caches, started cold in DIR) stay in DIR.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BUNDLE_FILES = ("gpu_check.json", "gpu_check.md", "logs.tgz")
MAX_BUNDLE_FILE = 16 * 2**20  # the results bundle stays small: at most 8 files, each under 16 MiB
LOG_TAIL = 2 * 2**20  # bytes kept of one log (its end: where a failure shows)
LOGS_TOTAL = 12 * 2**20  # bytes of logs in logs.tgz at most, before compression (a share each when many)
BUDGET_S = 470  # the real run: under 8 minutes with the machine's start-up and the bundle's copy
DRY_RUN_SCALE = 4  # the CPU dry run: every limit and the budget times this (2 shared cores compile slowly)
WEIGHTS = "random weights (python -m bench.shapes large, seed 0)"


@dataclass
class Step:
    name: str
    limit: int  # seconds, before the budget cuts it
    cmd: list[str]
    reserve: int = 0  # seconds kept for the steps after this one
    threads: int = 0  # compile weight in a parallel group (0: not compiling)
    env: dict[str, str] = field(default_factory=dict)


def shares(cores: int, weights: dict[str, int]) -> dict[str, int]:
    """``cores`` shared out in proportion to ``weights``: at least 1 each, in total at most ``max(cores, len)``."""
    total = sum(weights.values())
    out = {k: max(1, cores * w // total) for k, w in weights.items()}
    spare = cores - sum(out.values())
    for k in sorted(weights, key=weights.get, reverse=True):  # the remainder to the heaviest
        if spare <= 0:
            break
        out[k] += 1
        spare -= 1
    return out


def cut_limit(limit: int, left: float, reserve: int) -> int:
    """A step's limit cut to the budget left after the reserve of the steps behind it."""
    return int(max(0, min(limit, left - reserve)))


class Runner:
    """Runs steps under the budget and records each in ``DIR/steps.jsonl``."""

    def __init__(self, out: Path, budget: float, on_step: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.budget = budget
        self.clock = clock
        self.start = clock()
        self.on_step = on_step
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.records = out / "steps.jsonl"
        self.records.write_text("")

    def left(self) -> float:
        return self.budget - (self.clock() - self.start)

    def record(self, entry: dict[str, Any]) -> dict[str, Any]:
        with self.records.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return entry

    def run(self, steps: list[Step], env: dict[str, str]) -> list[dict[str, Any]]:
        """Run ``steps`` at the same time (one step: alone); return their records once all have ended. If the check
        itself is stopped (TERM, INT), the steps' process groups are killed first: no compile outlives it."""
        running: list[dict[str, Any]] = []

        def stop(signum: int, _frame: Any) -> None:
            for r in running:
                kill_group(r["proc"].pid, signal.SIGKILL)
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

        before = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run(steps, env, running)
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def _run(self, steps: list[Step], env: dict[str, str], running: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for step in steps:
            limit = cut_limit(step.limit, self.left(), step.reserve)
            if limit < 5:
                self.record({"step": step.name, "rc": None, "seconds": 0, "skipped": "time budget spent"})
                continue
            log = open(self.out / "logs" / f"{step.name}.log", "w")
            proc = subprocess.Popen(step.cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, **step.env}, start_new_session=True)
            say(f"== {step.name} (limit {limit}s{', ' + step.env['TORCHINDUCTOR_COMPILE_THREADS'] + ' compile threads' if 'TORCHINDUCTOR_COMPILE_THREADS' in step.env else ''})")
            running.append({"step": step, "proc": proc, "log": log, "t0": self.clock(), "limit": limit, "term_at": None})
        records = []
        while running:
            time.sleep(0.2)
            for r in list(running):
                pid, status, usage = os.wait4(r["proc"].pid, os.WNOHANG)
                now = self.clock()
                if pid == 0:
                    if r["term_at"] is None and now - r["t0"] > r["limit"]:
                        r["term_at"] = now
                        kill_group(r["proc"].pid, signal.SIGTERM)
                    elif r["term_at"] is not None and now - r["term_at"] > 10:
                        kill_group(r["proc"].pid, signal.SIGKILL)
                    continue
                r["proc"].returncode = rc = os.waitstatus_to_exitcode(status)
                kill_group(r["proc"].pid, signal.SIGKILL)  # anything the step left behind (compile workers)
                r["log"].close()
                running.remove(r)
                entry = {"step": r["step"].name, "rc": rc, "seconds": round(now - r["t0"], 1), "limit": r["limit"],
                         "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "timed_out": r["term_at"] is not None}
                records.append(self.record(entry))
                say(f"   {entry['step']}: rc {rc}, {entry['seconds']}s wall, {entry['cpu_s']}s CPU{' (killed at its limit)' if entry['timed_out'] else ''}")
                self.on_step()
        return records


def kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the plan ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    ckpt: Path
    make_ckpt: list[Step]
    baselines: list[Step]
    builds: list[Step]
    measures: Callable[[dict[str, Any]], list[Step]]  # built results -> measuring steps
    budget: float


def plan(out: Path, dry_run: bool, python: str, cores: int) -> Plan:
    """Every step with its limit and reserve (seconds of the real run; the dry run scales them)."""
    art = out / "artifacts"
    scale = DRY_RUN_SCALE if dry_run else 1
    device = "cpu" if dry_run else "cuda"
    py = [python, "-m"]
    if dry_run:
        from bench.shapes import TINY_FIXTURE

        ckpt, shape, weights = TINY_FIXTURE, "tiny", "random weights (tiny test fixture, seed 1234)"
        sizes = ["--docs-tokens", "4096", "--mix-docs", "256", "--parity-rows", "64", "--pass-seconds", "0.3",
                 "--repeats", "2", "--latency-iters", "10", "--latency-seconds", "1", "--batch-size", "32"]
    else:
        ckpt, shape, weights = art / "ckpt-large", "large", WEIGHTS
        sizes = []
    make_ckpt = [] if dry_run or (ckpt / "modules.json").is_file() else [Step("checkpoint", 60, [*py, "bench.shapes", "large", str(ckpt)], reserve=300)]
    common = ["--checkpoint", str(ckpt), "--device", device, "--vectors", str(art), "--weights", weights, *sizes]
    baselines = [Step("baselines", 150 * scale, [*py, "bench.speed.gpu_steps", "--out", str(out / "baselines.json"),
                                                 "--baselines", "fp32", "tf32", "bf16", "st-bf16", *common], reserve=150 * scale)]

    def build(name: str, precision: str, limit: int, weight: int) -> Step:
        engine = art / f"{shape}-{name}"
        return Step(f"build-{name}", limit * scale, [*py, "bench.speed.gpu_build", str(ckpt), str(engine), "--precision", precision,
                                                    "--device", device, "--out", str(out / f"build-{name}.json")], reserve=100 * scale, threads=weight)

    parity = Step("parity", 200 * scale, [*py, "bench.speed.gpu_parity", "--out", str(out / "parity.json"), "--workdir", str(art / "parity"),
                                          "--device", device, *(["--dry-run"] if dry_run else [])], reserve=100 * scale, threads=3)
    # bf16 (the engine served) gets the longest limit; fp16 and parity, whose end the group also waits for, less
    builds = [build("bf16.pt2", "bf16", 280, 8), build("fp16.pt2", "fp16", 240, 5), parity, build("fp16.onnx", "fp16", 60, 0),
              build("fp16.plan", "fp16", 60, 0)]
    weights_of = {s.name: s.threads for s in builds if s.threads}
    for s in builds:
        if s.threads:
            n = str(shares(cores, weights_of)[s.name])
            s.env = {"TORCHINDUCTOR_COMPILE_THREADS": n, "OMP_NUM_THREADS": n}

    def measures(merged: dict[str, Any]) -> list[Step]:
        """One measuring step for the engines that were built, the bf16 .pt2 first (and with CUDA graphs, last)."""
        built = [(label, art / f"{shape}-{name}") for label, name in (("pt2-bf16", "bf16.pt2"), ("pt2-fp16", "fp16.pt2"),
                 ("onnx-fp16", "fp16.onnx"), ("plan-fp16", "fp16.plan")) if merged.get(f"build-{name}", {}).get("status") == "passed"]
        if not built:
            return []
        engines = [arg for label, path in built for arg in ("--engine", f"{label}={path}")]
        graphs = ["--cuda-graphs", "pt2-bf16"] if built[0][0] == "pt2-bf16" else []
        return [Step("measure-engines", 120 * scale, [*py, "bench.speed.gpu_steps", "--out", str(out / "measure-engines.json"), *engines, *graphs, *common])]

    return Plan(ckpt, make_ckpt, baselines, builds, measures, BUDGET_S * scale)


# ---- the bundle ----------------------------------------------------------------------------------------------


def merged_results(out: Path) -> dict[str, Any]:
    """Every step's JSON in DIR, by file stem, and the step records."""
    merged: dict[str, Any] = {"steps": [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]}
    for path in sorted(out.glob("*.json")):
        try:
            merged[path.stem] = json.loads(path.read_text())
        except ValueError as exc:  # a step killed while writing
            merged[path.stem] = {"status": "unreadable", "error": str(exc)}
    return merged


def contenders(merged: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every measured contender (baselines and engines) by name."""
    out: dict[str, dict[str, Any]] = {}
    for key in ["baselines", *sorted(k for k in merged if k.startswith("measure-"))]:
        out.update(merged.get(key, {}).get("results", {}))
    return out


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def summarize(merged: dict[str, Any]) -> dict[str, Any]:
    """Per contender the headline figures, each engine's ratios to eager bf16 and to the sentence-transformers peer,
    and the issue's goals for the bf16 .pt2 (met, missed, or not measured)."""
    rows = {}
    for name, r in contenders(merged).items():
        tp = r.get("throughput", {})
        rows[name] = {
            "status": r.get("status"),
            "precision": r.get("precision"),
            **{f"docs_per_hour_{c}": _get(tp, c, "docs_per_hour") for c in ("128", "512", "mix")},
            **{f"tokens_per_s_{c}": _get(tp, c, "tokens_per_s") for c in ("128", "512", "mix")},
            **{f"mfu_{c}": _get(tp, c, "mfu") for c in ("128", "512", "mix")},
            "padding_waste_mix": _get(tp, "mix", "padding_waste"),
            **{f"p{q}_ms_{n}": _get(r, "batch1_latency", n, f"p{q}_ms") for n in ("32", "128") for q in ("50", "99")},
            **{f"graphs_p{q}_ms_{n}": _get(r, "cuda_graphs", "batch1_latency", n, f"p{q}_ms") for n in ("32", "128") for q in ("50", "99")},
            "load_s": r.get("load_s"),
            "load_took_mib": _get(r, "memory", "load_took_mib"),
            "allocator_peak_mib": _get(r, "memory", "allocator_peak_mib"),
            "parity_min_cosine": _get(r, "parity", "min_cosine"),
        }
    ratios = {}
    for name, row in rows.items():
        if name in ("fp32", "tf32", "bf16", "st-bf16"):
            continue
        ratios[name] = {}
        for base in ("bf16", "st-bf16", "fp32"):
            for c in ("128", "512", "mix"):
                a, b = row.get(f"docs_per_hour_{c}"), _get(rows, base, f"docs_per_hour_{c}")
                ratios[name][f"vs_{base}_{c}"] = a / b if a and b else None
    best = rows.get("pt2-bf16", {})
    lat = [v for v in (best.get("p50_ms_32"), best.get("graphs_p50_ms_32")) if v is not None]

    def goal(value: Any, target: float, higher: bool = True) -> dict[str, Any]:
        met = None if value is None else (value >= target if higher else value <= target)
        return {"value": value, "target": target, "met": met}

    goals = {
        "pt2-bf16 docs/hour at 128 tokens >= 20M": goal(best.get("docs_per_hour_128"), 20e6),
        "pt2-bf16 x eager bf16 on the mix >= 2.5": goal(_get(ratios, "pt2-bf16", "vs_bf16_mix"), 2.5),
        "pt2-bf16 x sentence-transformers bf16 on the mix >= 2": goal(_get(ratios, "pt2-bf16", "vs_st-bf16_mix"), 2.0),
        "pt2-bf16 batch-1 p50 at 32 tokens <= 3 ms (best of with/without CUDA graphs)": goal(min(lat) if lat else None, 3.0, higher=False),
    }
    return {"contenders": rows, "ratios": ratios, "goals": goals}


def markdown(merged: dict[str, Any]) -> str:
    """The summary as tables a reader can paste into docs/benchmarks.md."""
    s = merged["summary"]
    env = merged.get("env", {})
    lines = [f"# GPU check: {env.get('gpu') or 'no GPU'} ({'dry run' if env.get('dry_run') else 'real run'})", "",
             f"torch {_get(env, 'versions', 'torch')}, CUDA {env.get('torch_cuda')}, card {env.get('card')}; weights: "
             f"{_get(merged, 'baselines', 'weights')}", "", "| step | rc | wall s | CPU s | limit |", "|---|---|---|---|---|"]
    lines += [f"| {st['step']} | {st.get('rc')} | {st.get('seconds')} | {st.get('cpu_s', '')} | {st.get('limit', st.get('skipped', ''))} |" for st in merged["steps"]]

    def f(v: Any, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        return "-" if v is None else fmt.format(v * scale)

    lines += ["", "| contender | M docs/h 128 | M docs/h 512 | M docs/h mix | tok/s mix | padding mix | MFU 128 | p50/p99 ms 32 | p50/p99 ms 128 | graphs p50 32 | load MiB | peak MiB | min cos vs fp32 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in s["contenders"].items():
        lines.append(
            f"| {name} ({r['precision']}, {r['status']}) | {f(r['docs_per_hour_128'], 1e-6)} | {f(r['docs_per_hour_512'], 1e-6)} | "
            f"{f(r['docs_per_hour_mix'], 1e-6)} | {f(r['tokens_per_s_mix'], 1, '{:.0f}')} | {f(r['padding_waste_mix'], 100, '{:.1f}%')} | "
            f"{f(r['mfu_128'], 100, '{:.1f}%')} | {f(r['p50_ms_32'])}/{f(r['p99_ms_32'])} | {f(r['p50_ms_128'])}/{f(r['p99_ms_128'])} | "
            f"{f(r['graphs_p50_ms_32'])} | {f(r['load_took_mib'], 1, '{:.0f}')} | {f(r['allocator_peak_mib'], 1, '{:.0f}')} | {f(r['parity_min_cosine'], 1, '{:.6f}')} |")
    lines += ["", "| goal | value | met |", "|---|---|---|"]
    lines += [f"| {k} | {f(g['value'], 1, '{:.4g}')} | {g['met']} |" for k, g in s["goals"].items()]
    return "\n".join(lines) + "\n"


def write_bundle(out: Path, bundle: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rewrite the three bundle files from DIR (atomically: a kill mid-write leaves the previous bundle)."""
    from bench.common import portable

    bundle.mkdir(parents=True, exist_ok=True)
    merged = merged_results(out)
    merged.update(extra or {})
    merged["summary"] = summarize(merged)
    merged = portable(merged)
    payloads = {"gpu_check.json": (json.dumps(merged, indent=2) + "\n").encode(), "gpu_check.md": markdown(merged).encode(),
                "logs.tgz": logs_archive(out)}
    for name, data in payloads.items():
        if len(data) >= MAX_BUNDLE_FILE:
            raise RuntimeError(f"{name}: {len(data)} bytes, over the 16 MiB a bundle file may have")
        tmp = bundle / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(bundle / name)
    return merged


def logs_archive(out: Path, tail: int = LOG_TAIL, total: int = LOGS_TOTAL) -> bytes:
    """logs/*.log (each its last ``tail`` bytes, less when many logs would pass ``total``), the per-step JSON and
    every engine manifest, gzipped tar."""
    buf = io.BytesIO()
    logs = sorted((out / "logs").glob("*.log"))
    tail = min(tail, total // max(1, len(logs)))
    files = [*logs, *sorted(out.glob("*.json")), out / "steps.jsonl", *sorted((out / "artifacts").glob("*.manifest.json"))]
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in files:
            if not path.is_file():
                continue
            data = path.read_bytes()
            data = data[-tail:] if path.suffix == ".log" else data
            info = tarfile.TarInfo(str(path.relative_to(out)))
            info.size = len(data)
            info.mtime = int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ---- the command ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from runtime.exit_codes import EPILOG

    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("dir", type=Path, help="work folder: per-step JSON, logs/, artifacts/ (checkpoints, engines, caches)")
    p.add_argument("--bundle", type=Path, required=True, help="folder of the results to keep: gpu_check.json, gpu_check.md, logs.tgz")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU with the tiny fixture: checks the check, not the GPU")
    p.add_argument("--budget", type=float, help="seconds for the whole check. Default: 470 (dry run: 4 x 470)")
    p.add_argument("--debug", action="store_true", help="tracebacks on stderr")
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> int:
    out = args.dir.resolve()
    bundle = args.bundle.resolve()
    if out == bundle or out in bundle.parents or bundle in out.parents:
        raise ValueError(f"--bundle {args.bundle} must not be DIR, inside it or hold it: DIR holds GBs of artifacts, the bundle only the results")
    out.mkdir(parents=True, exist_ok=True)
    art = out / "artifacts"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(art / "inductor-cache"), "TRITON_CACHE_DIR": str(art / "triton-cache"),
           "PYTHONUNBUFFERED": "1"}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p = plan(out, args.dry_run, sys.executable, cores)
    if args.budget:
        p.budget = args.budget
    t0 = time.monotonic()
    runner = Runner(out, p.budget, on_step=lambda: write_bundle(out, bundle))
    py = [sys.executable, "-m"]
    first = runner.run([Step("env", 30, [*py, "bench.speed.gpu_env", "--out", str(out / "env.json"), *(["--dry-run"] if args.dry_run else [])])], env)
    gpu = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
    if not args.dry_run and not gpu.get("cuda_available"):
        write_bundle(out, bundle)
        raise NoGpu(f"torch sees no CUDA GPU here (env step rc {first[0]['rc'] if first else None}): run with --dry-run on a CPU")
    for group in (p.make_ckpt, p.baselines, p.builds):
        if group:
            runner.run(group, env)
    for step in p.measures(merged_results(out)):  # the engines that were built, one at a time on the GPU
        runner.run([step], env)
    from bench.speed.gpu_env import nvidia_smi

    merged = write_bundle(out, bundle, {"nvidia_smi_end": nvidia_smi(), "total_seconds": round(time.monotonic() - t0, 1)})
    say(markdown(merged))
    say(f"gpu_check: {time.monotonic() - t0:.0f}s; bundle in {args.bundle} ({', '.join(BUNDLE_FILES)})")
    return 0 if all(r.get("rc") == 0 for r in merged["steps"]) else 4


class NoGpu(RuntimeError):
    """No CUDA GPU where the real check must run (exit 3)."""


def main(argv: list[str] | None = None) -> int:
    from runtime.exit_codes import ENVIRONMENT, USAGE, run_cli

    args = parse_args(argv)
    return run_cli(lambda: check(args), prog="gpu_check", known={NoGpu: ENVIRONMENT, ValueError: USAGE}, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
