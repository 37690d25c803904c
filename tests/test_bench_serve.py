"""``python -m bench.speed.serve`` end to end on the tiny engine, in a few seconds: both servers, JSON and PNG, no machine paths."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("matplotlib")

from bench.speed.serve import main  # noqa: E402


@pytest.mark.parametrize("generator", ["python", "wrk", "hey"])
def test_bench_serve_smoke(tmp_path, tiny_engine, generator):
    if generator != "python" and shutil.which(generator) is None:
        pytest.skip(f"{generator} is not installed (apt-get install {generator})")
    out = tmp_path / "serve.json"
    rc = main(["--engine", str(tiny_engine), "--docs", "20", "--clients", "1", "--items", "1", "3", "--seconds", "1",
               "--warmup", "0.2", "--offline-repeats", "1", "--direct-calls", "5", "--port", "0", "--out", str(out),
               "--load-generator", generator])
    assert rc == 0 and out.with_suffix(".png").stat().st_size > 0
    text = out.read_text()
    report = json.loads(text)
    assert str(tmp_path) not in text and "/fixtures/" not in text  # paths are named by role, not by this machine's folders
    assert report["offline"]["docs_per_s"] > 0 and report["offline"]["direct_single_p50_ms"] > 0
    for name in ("runtime", "naive"):
        server = report["servers"][name]
        assert [(c["clients"], c["items_per_request"]) for c in server["cells"]] == [(1, 1), (1, 3)]
        for cell in server["cells"]:
            assert cell["status_5xx"] == 0 and cell["connection_errors"] == 0 and cell["answered"] == cell["sent"] > 0
            assert cell["measured_requests"] > 0 and cell["p50_ms"] > 0 and cell["load_generator"] == generator
            assert cell["docs_per_s"] == pytest.approx(cell["requests_per_s"] * cell["items_per_request"])
        assert server["peak_rss_bytes"] > 0
    assert report["servers"]["runtime"]["exit_code"] == 0
    assert report["servers"]["runtime"]["command"].startswith("python -m runtime.serve --engine tiny.onnx")
    assert 0 < report["servers"]["runtime"]["cells"][0]["share_of_offline"]
    paired = report["servers"]["runtime"]["paired_single_item"]
    assert paired["calls"] == 5 and paired["server_p50_ms"] > 0 and paired["direct_p50_ms"] > 0
    assert report["targets"]["n1_m1_added_p50_ms"]["value"] == paired["added_p50_ms"]
    assert set(report["targets"]) == {"n1_m1_added_p50_ms"}  # no N=16 cell in this run


def test_before_variant_and_after_in_one_run(tmp_path, tiny_engine):
    """--before-src runs another checkout's server (here this checkout, as its own 'before') and --variant this
    server with other options, under the same cells and paired calls, with an offline reading after each server;
    --rounds 2 runs that sequence twice, each cell from its median round."""
    from tests.serve_support import ROOT

    out = tmp_path / "serve.json"
    rc = main(["--engine", str(tiny_engine), "--docs", "10", "--clients", "2", "--items", "1", "--seconds", "0.5", "--warmup", "0",
               "--offline-repeats", "1", "--direct-calls", "2", "--port", "0", "--out", str(out), "--no-naive",
               "--load-generator", "python", "--before-src", str(ROOT), "--variant", "replicas2=--replicas 2 --threads 1",
               "--rounds", "2"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert list(report["servers"]) == ["runtime", "replicas2", "before"]
    for name, server in report["servers"].items():
        assert server["exit_code"] == 0 and server["cells"][0]["status_2xx"] > 0 and "server_mean_batch_rows" in server["cells"][0]
        assert server["paired_single_item"]["calls"] == 2 and len(server["paired_single_item"]["added_p50_ms_rounds"]) == 2
        assert server["exit_codes"] == [0, 0] and len(server["offline_docs_per_s_after"]) == 2
        cell = server["cells"][0]
        assert len(cell["docs_per_s_rounds"]) == 2 and cell["docs_per_s"] == min(cell["docs_per_s_rounds"])  # lower middle of 2
    assert report["servers"]["replicas2"]["command"].endswith("--replicas 2 --threads 1")
    rates = [report["offline"]["docs_per_s_at_start"], *(r for s in report["servers"].values() for r in s["offline_docs_per_s_after"])]
    assert report["offline"]["docs_per_s"] == max(rates) and report["offline"]["docs_per_s_at_end"] == report["servers"]["before"]["offline_docs_per_s_after"][-1]
    assert report["settings"]["before_src"] == "BEFORE_SRC"


@pytest.mark.parametrize("spec", ["replicas2", "runtime=--replicas 2", "two words=--replicas 2"])
def test_a_variant_needs_a_new_one_word_name(spec):
    with pytest.raises(SystemExit, match="NAME=ARGS"):
        main(["--engine", "x.onnx", "--variant", spec])


def test_rounds_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["--engine", "x.onnx", "--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err
