"""One throughput peer in its own process, driven by ``bench.speed.peers`` over a line protocol (JSON, one object a line).

Run as a script by any Python that has the peer's library (the project's .venv, or a venv of
``bench/install_peers.sh``); it imports nothing from this project, so it works in a venv without it.

Requests on stdin, answers on stdout (everything the libraries print goes to stderr):
- ``{"op": "load", "peer": NAME, "model_dir": DIR, "workdir": DIR, "threads": N, "batch_size": B, "prompt": S|null,
  "calibration": [texts]}`` -> ``{"ok": true, "info": {...}}``: build (export, quantize; a static int8 export
  calibrates on ``calibration``) and load the peer's model from local files only;
- ``{"op": "corpus", "texts": [...]}`` -> ``{"ok": true}``: the texts every ``encode`` encodes;
- ``{"op": "encode", "out": PATH|null}`` -> ``{"ok": true, "seconds": s}``: encode the corpus once (timed here,
  so the protocol is not), and with ``out`` save the vectors there as float32 ``.npy``;
- ``{"op": "quit"}``.
A failure answers ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

HUB_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _version(dist: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _st_torch(req: dict[str, Any]) -> tuple[Callable[[list[str]], Any], dict[str, Any]]:
    """sentence-transformers on PyTorch; an INSTRUCTOR prompt is left out of the pooling as InstructorEmbedding does."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling

    _set_threads(req["threads"])
    model = SentenceTransformer(req["model_dir"], device="cpu", local_files_only=True)
    for module in model:
        if isinstance(module, Pooling):
            module.include_prompt = False
    prompt = req.get("prompt")

    def encode(texts: list[str]) -> Any:
        return model.encode(texts, batch_size=req["batch_size"], prompt=prompt, convert_to_numpy=True)

    return encode, {"library": f"sentence-transformers {_version('sentence-transformers')}", "torch": _version("torch")}


def _model_copy(req: dict[str, Any], name: str = "st-onnx-model") -> Path:
    """A writable copy of the model folder (the ONNX and OpenVINO exporters write ``onnx/``, ``openvino/`` into it)."""
    dst = Path(req["workdir"]) / name
    if not (dst / "modules.json").is_file():
        shutil.copytree(req["model_dir"], dst, dirs_exist_ok=True)
    return dst


def _quantization_config() -> str:
    """sentence-transformers' dynamic int8 preset for this CPU, as its docs advise choosing it."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    return "avx512" if "avx512f" in flags else ("avx2" if "avx2" in flags else "arm64")


def _st_onnx(req: dict[str, Any]) -> tuple[Callable[[list[str]], Any], dict[str, Any]]:
    """sentence-transformers ``backend="onnx"`` (Optimum export), fp32 or its ``export_dynamic_quantized_onnx_model``."""
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer

    folder = _model_copy(req)
    so = ort.SessionOptions()
    if req["threads"]:
        so.intra_op_num_threads = req["threads"]
    kwargs: dict[str, Any] = {"provider": "CPUExecutionProvider", "session_options": so}
    fp32_file = folder / "onnx" / "model.onnx"
    if not fp32_file.is_file():
        exporter = SentenceTransformer(str(folder), device="cpu", backend="onnx", local_files_only=True,
                                       model_kwargs={"provider": "CPUExecutionProvider"})
        exporter.save_pretrained(str(folder))
    info = {"library": f"sentence-transformers {_version('sentence-transformers')}", "optimum-onnx": _version("optimum-onnx"),
            "onnxruntime": _version("onnxruntime")}
    file_name = "onnx/model.onnx"
    if req["peer"] == "st-onnx-qint8":
        from sentence_transformers import export_dynamic_quantized_onnx_model

        config = _quantization_config()
        written = sorted((folder / "onnx").glob(f"model_*int8_{config}.onnx"))  # qint8, or quint8 for avx2
        if not written:
            fp32 = SentenceTransformer(str(folder), device="cpu", backend="onnx", local_files_only=True,
                                       model_kwargs={**kwargs, "file_name": "onnx/model.onnx"})
            export_dynamic_quantized_onnx_model(fp32, config, str(folder))
            written = sorted((folder / "onnx").glob(f"model_*int8_{config}.onnx"))
        file_name = f"onnx/{written[0].name}"
        info["quantization_config"] = config
    model = SentenceTransformer(str(folder), device="cpu", backend="onnx", local_files_only=True,
                                model_kwargs={**kwargs, "file_name": file_name})
    info["file"] = file_name

    def encode(texts: list[str]) -> Any:
        return model.encode(texts, batch_size=req["batch_size"], convert_to_numpy=True)

    return encode, info


def _st_openvino(req: dict[str, Any]) -> tuple[Callable[[list[str]], Any], dict[str, Any]]:
    """sentence-transformers ``backend="openvino"`` (optimum-intel export): as a user gets it (the CPU plugin picks
    its own inference precision: bf16 where the CPU has AMX or AVX512-BF16), pinned to f32 (``st-openvino-f32``), or
    its static int8 (``export_static_quantized_openvino_model``, NNCF calibrated on the bench's calibration texts, a
    local dataset). The precision the plugin compiled for is reported, since it decides the speed. An INSTRUCTOR
    prompt is left out of the pooling, as in ``_st_torch`` (the pooling runs in PyTorch after the OpenVINO model)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling

    folder = _model_copy(req, "st-openvino-model")
    config = {"INFERENCE_NUM_THREADS": str(req["threads"])} if req["threads"] else {}
    if req["peer"] == "st-openvino-f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    kwargs: dict[str, Any] = {"ov_config": config}
    fp32_file = folder / "openvino" / "openvino_model.xml"
    if not fp32_file.is_file():
        SentenceTransformer(str(folder), device="cpu", backend="openvino", local_files_only=True, model_kwargs=kwargs).save_pretrained(str(folder))
    info = {"library": f"sentence-transformers {_version('sentence-transformers')}", "optimum-intel": _version("optimum-intel"),
            "openvino": _version("openvino")}
    file_name = "openvino/openvino_model.xml"
    if req["peer"] == "st-openvino-qint8":
        from optimum.intel import OVQuantizationConfig
        from sentence_transformers import export_static_quantized_openvino_model

        texts = list(req.get("calibration") or [])
        if not texts:
            raise RuntimeError("no calibration texts for the static int8 export")
        qfile = folder / "openvino" / "openvino_model_qint8_quantized.xml"
        if not qfile.is_file():
            data = Path(req["workdir"]) / "openvino-calibration"
            data.mkdir(parents=True, exist_ok=True)
            (data / "train.jsonl").write_text("".join(json.dumps({"sentence": t}) + "\n" for t in texts))
            fp32 = SentenceTransformer(str(folder), device="cpu", backend="openvino", local_files_only=True,
                                       model_kwargs={**kwargs, "file_name": file_name})
            export_static_quantized_openvino_model(fp32, OVQuantizationConfig(num_samples=len(texts)), str(folder),
                                                   dataset_name=str(data), dataset_config_name="default",
                                                   dataset_split="train", column_name="sentence")
        file_name = f"openvino/{qfile.name}"
        info["calibration_texts"] = len(texts)
    model = SentenceTransformer(str(folder), device="cpu", backend="openvino", local_files_only=True,
                                model_kwargs={**kwargs, "file_name": file_name})
    info["file"] = file_name
    info["inference_precision"] = model[0].auto_model.request.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    for module in model:
        if isinstance(module, Pooling):
            module.include_prompt = False
    prompt = req.get("prompt")

    def encode(texts: list[str]) -> Any:
        return model.encode(texts, batch_size=req["batch_size"], prompt=prompt, convert_to_numpy=True)

    return encode, info


FASTEMBED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
FASTEMBED_FILES = ("tokenizer.json", "config.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _fastembed(req: dict[str, Any]) -> tuple[Callable[[list[str]], Any], dict[str, Any]]:
    """fastembed on a local ONNX folder: the Optimum export that the st-onnx peer wrote (fastembed's own file for
    this model is such an export), with the checkpoint's tokenizer files, truncating at the model's max_seq_length."""
    from fastembed import TextEmbedding

    src = Path(req["workdir"]) / "st-onnx-model"
    onnx_file = src / "onnx" / "model.onnx"
    if not onnx_file.is_file():
        raise RuntimeError(f"{onnx_file}: missing; fastembed runs the ONNX export of the st-onnx peer, run that peer first")
    folder = Path(req["workdir"]) / "fastembed-model"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_file, folder / "model.onnx")
    for name in FASTEMBED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    # fastembed truncates at the smaller of tokenizer_config's model_max_length and max_length (here 512 and the
    # 128 that the re-saved tokenizer carries); the model's own limit, which sentence-transformers applies and
    # fastembed's hosted copy of this model states, is max_seq_length
    max_len = json.loads((Path(req["model_dir"]) / "sentence_bert_config.json").read_text())["max_seq_length"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": max_len, "max_length": max_len}))
    model = TextEmbedding(FASTEMBED_NAME, threads=req["threads"] or None, specific_model_path=str(folder),
                          local_files_only=True, cache_dir=str(Path(req["workdir"]) / "fastembed-cache"))

    def encode(texts: list[str]) -> Any:
        import numpy as np

        return np.stack(list(model.embed(texts, batch_size=req["batch_size"])))

    return encode, {"library": f"fastembed {_version('fastembed')}", "onnxruntime": _version("onnxruntime"),
                    "model": f"{FASTEMBED_NAME} (its registered pooling) from {folder.name}/model.onnx"}


def _infinity(req: dict[str, Any]) -> tuple[Callable[[list[str]], Any], dict[str, Any]]:
    """infinity_emb's Python engine (``AsyncEmbeddingEngine``, torch backend), all texts submitted at once."""
    import asyncio

    import numpy as np
    from infinity_emb import AsyncEngineArray, EngineArgs

    _set_threads(req["threads"])
    args = EngineArgs(model_name_or_path=req["model_dir"], engine="torch", device="cpu", batch_size=req["batch_size"],
                      model_warmup=False, bettertransformer=False, compile=False)
    loop = asyncio.new_event_loop()
    array = AsyncEngineArray.from_args([args])
    engine = array[0]
    loop.run_until_complete(engine.astart())

    def encode(texts: list[str]) -> Any:
        vectors, _usage = loop.run_until_complete(engine.embed(sentences=texts))
        return np.stack(vectors)

    return encode, {"library": f"infinity_emb {_version('infinity_emb')}", "torch": _version("torch"), "engine": "torch"}


PEERS: dict[str, Callable[[dict[str, Any]], tuple[Callable[[list[str]], Any], dict[str, Any]]]] = {
    "st-torch": _st_torch,
    "st-onnx": _st_onnx,
    "st-onnx-qint8": _st_onnx,
    "fastembed": _fastembed,
    "infinity": _infinity,
    "st-openvino": _st_openvino,
    "st-openvino-f32": _st_openvino,
    "st-openvino-qint8": _st_openvino,
}


def serve(inp: Any, out: Any) -> None:
    """Answer requests from ``inp`` on ``out`` until ``quit`` or end of input."""
    encode: Callable[[list[str]], Any] | None = None
    texts: list[str] = []
    for line in inp:
        req = json.loads(line)
        try:
            if req["op"] == "quit":
                break
            if req["op"] == "load":
                os.environ.update(HUB_OFFLINE)
                Path(req["workdir"]).mkdir(parents=True, exist_ok=True)
                encode, info = PEERS[req["peer"]](req)
                answer: dict[str, Any] = {"ok": True, "info": {**info, "python": sys.version.split()[0]}}
            elif req["op"] == "corpus":
                texts = list(req["texts"])
                answer = {"ok": True}
            elif req["op"] == "encode":
                if encode is None:
                    raise RuntimeError("encode before load")
                t0 = time.perf_counter()
                vectors = encode(texts)
                seconds = time.perf_counter() - t0
                if req.get("out"):
                    import numpy as np

                    np.save(req["out"], np.asarray(vectors, dtype=np.float32))
                answer = {"ok": True, "seconds": seconds}
            else:
                raise ValueError(f"unknown op {req['op']!r}")
        except Exception as exc:  # the peer's failure is reported to the bench, which skips the peer
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def main() -> None:
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever the libraries print must not reach the protocol
    sys.stdout = sys.stderr
    serve(sys.stdin, protocol)


if __name__ == "__main__":
    main()
