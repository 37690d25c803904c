"""Ray Data encoding (local cluster, 2 workers, the tiny engine): equal to the single-process CLI, fault-tolerant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from runtime import encode  # noqa: E402
from runtime.ray_encode import read_output  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INSTR = "Represent the document for retrieval: "


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """600 rows: ids, per-row instructions (some none), empty and over-long texts."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rows = []
    for i in range(600):
        text = " ".join(words[(i * 7 + k) % len(words)] for k in range((i * 13) % 90))
        row = {"id": f"doc-{i}", "text": text if i % 97 else "word " * 700}
        if i % 3:
            row["q"] = INSTR if i % 2 else "Q:"
        else:
            row["q"] = ""
        rows.append(row)
    path = tmp_path_factory.mktemp("ray") / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cli(*argv: str) -> int:
    return encode.main([*argv, "--quiet"])


@pytest.fixture(scope="module")
def single(tiny_engine, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "single.parquet"
    assert _cli("--engine", str(tiny_engine), "--input", str(corpus), "--output", str(out),
                "--instruction-field", "q", "--id-field", "id", "--shard-rows", "64") == 0
    return pq.read_table(out)


def _assert_same(ray_out: Path, single) -> None:
    got = read_output(ray_out)
    assert got.num_rows == single.num_rows == 600
    assert got.column("line").to_pylist() == single.column("line").to_pylist()  # no row lost or duplicated
    assert got.column("id").to_pylist() == single.column("id").to_pylist()
    a = np.stack(got.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(single.column("embedding").to_numpy(zero_copy_only=False))
    assert np.abs(a - b).max() <= 1e-6


def test_ray_output_equals_single_process_cli(tiny_engine, corpus, single, tmp_path):
    out = tmp_path / "emb"
    assert _cli("--engine", str(tiny_engine), "--input", str(corpus), "--output", str(out), "--instruction-field", "q",
                "--id-field", "id", "--ray", "--num-workers", "2") == 0
    _assert_same(out, single)
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["rows"] == 600 and summary["workers"] == 2 and summary["truncated_rows"] == 7
    assert summary["tokens"] > 0 and summary["docs_per_s"] > 0


def test_killed_actor_loses_and_duplicates_nothing(tiny_engine, corpus, single, tmp_path):
    from runtime.job import EncodeJob, RayOptions
    from runtime.ray_encode import encode_with_ray

    marker = str(tmp_path / "killed")

    def kill_first_actor_once() -> None:  # runs inside the actor process
        import os
        import signal

        if not os.path.exists(marker):
            with open(marker, "w") as fh:
                fh.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    out = tmp_path / "emb"
    job = EncodeJob(tiny_engine, corpus, out, instruction_field="q", id_field="id", quiet=True,
                    ray=RayOptions(num_workers=2, span_bytes=4096))
    summary = encode_with_ray(job, before_batch=kill_first_actor_once)
    assert Path(marker).is_file()  # an actor really died (SIGKILL) during the run
    assert summary.rows == 600
    _assert_same(out, single)


def test_bad_input_reported_as_in_cli(tiny_engine, tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken}\n{"body": "no text"}\n', encoding="utf-8")
    rc_single = _cli("--engine", str(tiny_engine), "--input", str(src), "--output", str(tmp_path / "a.npy"))
    single_err = capsys.readouterr().err
    rc_ray = _cli("--engine", str(tiny_engine), "--input", str(src), "--output", str(tmp_path / "b"), "--ray")
    ray_err = capsys.readouterr().err
    assert rc_single == rc_ray == 1
    assert f"{src}:3: malformed JSON" in single_err
    assert single_err.strip().splitlines()[-1] == ray_err.strip().splitlines()[-1]
    assert not (tmp_path / "b").exists()

    assert _cli("--engine", str(tiny_engine), "--input", str(src), "--output", str(tmp_path / "c"), "--ray",
                "--on-error", "skip") == 0
    summary = json.loads((tmp_path / "c.summary.json").read_text())
    assert summary["rows"] == 2 and summary["skipped_rows"] == 2 and summary["skipped_lines"] == [3, 4]
    assert "field 'text': missing" in summary["skipped_errors"][1]


def test_without_ray_installed_the_cli_says_what_to_install(tiny_engine, corpus, tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from runtime import encode\n"
        f"sys.exit(encode.main(['--engine', {str(tiny_engine)!r}, '--input', {str(corpus)!r}, "
        f"'--output', {str(tmp_path / 'o')!r}, '--ray', '--quiet']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3  # a missing optional package is the environment (runtime.exit_codes)
    assert "pip install 'instructor-stack[dist]'" in proc.stderr


def test_worker_refuses_or_rebuilds_a_plan_for_another_gpu(monkeypatch, tmp_path):
    """The decision an actor takes on a .plan built elsewhere (the rebuild itself needs a GPU: bench/gpu_check.sh)."""
    import runtime.backends.tensorrt_build as build
    import runtime.encoder
    import runtime.ray_encode as ray_encode
    from runtime.backends.tensorrt import PlanTargetMismatch

    rebuilt = tmp_path / "cache" / "big.plan"
    opened = []

    class FakeEncoder:
        def __init__(self, engine, **_):
            if str(engine).endswith("orig.plan"):
                raise PlanTargetMismatch(f"{engine}: built for compute capability 8.0, this GPU is 9.0")
            opened.append(engine)

    monkeypatch.setattr(runtime.encoder, "Encoder", FakeEncoder)
    monkeypatch.setattr(ray_encode, "load_manifest", lambda engine: f"manifest of {engine}")
    monkeypatch.setattr(build, "rebuild_for_this_gpu", lambda manifest: rebuilt)
    from runtime.job import EncodeJob, RayOptions

    job = EncodeJob("/e/orig.plan", "in.jsonl", "out", ray=RayOptions(build_on_worker=False))
    with pytest.raises(PlanTargetMismatch, match="compute capability 8.0"):
        ray_encode.open_worker_encoder(job, "cuda")
    ray_encode.open_worker_encoder(EncodeJob("/e/orig.plan", "in.jsonl", "out", ray=RayOptions(build_on_worker=True)), "cuda")
    assert opened == [rebuilt]


def test_plan_profile_round_trips_through_the_manifest():
    from runtime.backends.tensorrt_build import Profile

    profile = Profile(max_batch=64, opt_batch=32, max_seq=512, opt_seq=128)
    assert Profile.from_dict(profile.as_dict()) == profile


def test_an_unused_instruction_field_is_warned_as_in_cli(tiny_engine, tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "plain"}\n{"text": "x", "instruction": "Represent: "}\n', encoding="utf-8")
    assert _cli("--engine", str(tiny_engine), "--input", str(src), "--output", str(tmp_path / "a.npy")) == 0
    single = capsys.readouterr().err
    assert _cli("--engine", str(tiny_engine), "--input", str(src), "--output", str(tmp_path / "b"), "--ray") == 0
    on_ray = capsys.readouterr().err
    warning = f"warning: {src}:2: rows have an 'instruction' field, but without --instruction-field it is not used"
    assert warning in single and warning in on_ray
    assert json.loads((tmp_path / "b.summary.json").read_text())["warnings"] == json.loads(
        (tmp_path / "a.npy.summary.json").read_text())["warnings"]
