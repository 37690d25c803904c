"""``.pt2`` backend: an AOTInductor package (``torch.export`` + AOTInductor) run by the torch it was built with.

This is the one backend that needs torch, so torch is imported here only, when a ``.pt2`` is opened: the light
install never imports it. A package is compiled code for one torch build and one device kind (and, on CUDA, one
GPU architecture). The manifest records them (``pt2.torch``, ``pt2.device``, ``pt2.compute_capability``) and a
mismatch is refused with ``EngineError`` before the package is loaded.

On CUDA every call stages the batch in pinned host buffers (grown as batches grow, never shrunk), copies it to the
GPU with non-blocking copies on the backend's own stream, runs the package on that stream and copies the vectors
back the same way: one synchronization per batch. Tokenizing overlaps with it in the encoder's producer thread.
Engines whose manifest says ``tf32_islands`` (fp16/bf16 built for CUDA) run their fp32 matmuls (the FF output
projection, Dense) with TF32 tensor cores during the call, as TensorRT and ONNX Runtime's CUDA EP do for fp32
layers of fp16 engines; the process's own setting is restored after each call.

``cuda_graphs=True`` (CUDA only) replays batches of at most ``GRAPH_MAX_ROWS`` rows as CUDA graphs, one per
length bucket (``graph_bucket``: rows and tokens rounded up to powers of two), captured on first use: a batch-1
call of a 24-layer encoder launches hundreds of kernels, and when launching them costs more than running them a
replay is one launch. The batch is padded to its bucket with masked positions and masked-in padding rows
(``pad_to_bucket``), which leaves the real rows' vectors unchanged. If a capture fails, the reason is kept
(``graph_stats``) and every call runs without graphs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from runtime.backends.cuda import device_index
from runtime.batching import GPU_MAX_TOKENS
from runtime.bundle import INPUT_NAMES, OUTPUT_NAME, EngineError, Manifest
from runtime.deps import MissingDependency
from runtime.manifest_schema import RECORD_KEY


GRAPH_MAX_ROWS = 8  # batches up to this many rows replay a CUDA graph (latency-bound sizes); larger ones run as is
GRAPH_MIN_LENGTH = 16  # the shortest length bucket


class Pt2TargetMismatch(EngineError):
    """A ``.pt2`` built for another torch build, device kind or GPU architecture (re-export it where it runs)."""


def build_target(device: str) -> dict[str, str]:
    """What a package compiled with this torch for ``device`` is tied to (recorded in the manifest at export)."""
    import torch

    kind = "cuda" if device.startswith("cuda") else "cpu"
    target = {"torch": torch.__version__, "device": kind}
    if kind == "cuda":
        index = device_index(device)
        major, minor = torch.cuda.get_device_capability(index)
        target.update(
            compute_capability=f"{major}.{minor}", device_name=torch.cuda.get_device_name(index), cuda=str(torch.version.cuda)
        )
    return target


def recorded_target(manifest: Manifest) -> dict[str, Any]:
    """The manifest's ``pt2`` fields, checked for what the backend needs."""
    info = manifest.data.get("pt2")
    if not isinstance(info, dict) or not isinstance(info.get("torch"), str) or info.get("device") not in ("cpu", "cuda"):
        raise EngineError(f"{manifest.engine}: the manifest lacks pt2.torch / pt2.device (re-export the .pt2 with `python -m export`)")
    return info


def check_target(manifest: Manifest, built: dict[str, Any], here: dict[str, str]) -> None:
    """Refuse a package built with another torch, for another device kind, or for another GPU architecture."""

    def describe(t: dict[str, Any]) -> str:
        gpu = f" (compute capability {t.get('compute_capability')})" if t["device"] == "cuda" else ""
        return f"torch {t['torch']} on {t['device']}{gpu}"

    same = built["torch"] == here["torch"] and built["device"] == here["device"]
    if same and here["device"] == "cuda":
        same = str(built.get("compute_capability")) == here["compute_capability"]
    if not same:
        raise Pt2TargetMismatch(
            f"{manifest.engine}: built with {describe(built)}, this is {describe(here)}; a .pt2 runs only where it was "
            f"built: re-export it here (python -m export CHECKPOINT --out {manifest.engine} --device {here['device']})"
        )


def _import_torch(manifest: Manifest, built: dict[str, Any]) -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependency(
            f"{manifest.engine}: a .pt2 engine runs on torch, which is not installed ({exc}); it was built with "
            f"torch {built['torch']}: install that version, or use the .onnx engine"
        ) from exc
    return torch


def _metadata(package: Any) -> dict[str, str]:
    """The package's metadata (where the exporter put its engine record); empty if this torch cannot read it."""
    try:
        return dict(package.get_metadata())
    except Exception:  # noqa: BLE001 - a package without metadata support is checked by the manifest alone
        return {}


def graph_bucket(rows: int, length: int, max_length: int) -> tuple[int, int]:
    """The (rows, tokens) a batch is padded to for its CUDA graph: each rounded up to a power of two, tokens at
    least ``GRAPH_MIN_LENGTH`` and at most the engine's ``max_length``."""
    if rows < 1 or length < 1 or length > max_length:
        raise ValueError(f"no graph bucket for {rows} rows of {length} tokens (max {max_length})")
    padded = max(GRAPH_MIN_LENGTH, 1 << (length - 1).bit_length())
    return 1 << (rows - 1).bit_length(), min(padded, max_length)


def pad_to_bucket(arrays: list[np.ndarray], rows: int, length: int) -> list[np.ndarray]:
    """``input_ids``, ``attention_mask``, ``instruction_count`` padded to ``rows`` x ``length``: added positions are
    masked out (id 0), added rows hold one masked-in id 0 so that their pooling stays finite (they are dropped)."""
    ids, mask, count = arrays
    b, n = ids.shape
    out = [np.zeros((rows, length), np.int64), np.zeros((rows, length), np.int64), np.zeros(rows, np.int64)]
    out[0][:b, :n] = ids
    out[1][:b, :n] = mask
    out[1][b:, 0] = 1
    out[2][:b] = count
    return out


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: list[Any]  # static device tensors the replay reads
    output: Any  # the static device tensor it writes


class Pt2Backend:
    """Runs an AOTInductor package with dynamic batch and sequence on the CPU or one CUDA GPU."""

    def __init__(self, manifest: Manifest, device: str | None = None, cuda_graphs: bool = False) -> None:
        built = recorded_target(manifest)
        torch = _import_torch(manifest, built)
        device = device or built["device"]
        on_cuda = device.startswith("cuda")
        if cuda_graphs and not on_cuda:
            raise ValueError(f"{manifest.engine}: cuda_graphs needs a CUDA device, not device={device!r}")
        if on_cuda and not torch.cuda.is_available():
            raise EngineError(f"{manifest.engine}: device={device!r}, but torch {torch.__version__} sees no usable CUDA GPU")
        self.index = device_index(device) if on_cuda else -1
        check_target(manifest, built, build_target(device))
        self.torch = torch
        try:
            self.model = torch._inductor.aoti_load_package(str(manifest.engine), device_index=self.index)
        except Exception as exc:  # torch raises RuntimeError subclasses of its own for unreadable packages
            raise EngineError(f"{manifest.engine}: torch cannot load the AOTInductor package ({exc})") from exc
        manifest.check_engine(built.get("inputs", INPUT_NAMES), OUTPUT_NAME, None, _metadata(self.model).get(RECORD_KEY), carries_record=True)
        self.device = "cuda" if on_cuda else "cpu"
        self.torch_device = torch.device("cuda", self.index) if on_cuda else torch.device("cpu")
        self.max_rows = int(built["max_batch"]) if isinstance(built.get("max_batch"), int) else None
        self.default_max_tokens = GPU_MAX_TOKENS if on_cuda else None
        self.tf32 = on_cuda and bool(built.get("tf32_islands"))
        self.stream = torch.cuda.Stream(self.torch_device) if on_cuda else None
        self.pinned: dict[str, Any] = {}
        self.name = f"torch-aoti:{torch.__version__}:{self.device}"
        self.cuda_graphs = cuda_graphs
        self.max_length = int(built.get("max_seq_length") or 512)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.graph_error: str | None = None
        self.graph_replays = 0

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        arrays = [np.ascontiguousarray(feeds[name], dtype=np.int64) for name in INPUT_NAMES]
        torch = self.torch
        if self.stream is None:
            with torch.inference_mode():
                return self.model(*(torch.from_numpy(a) for a in arrays)).numpy()
        if self.cuda_graphs and self.graph_error is None and arrays[0].shape[0] <= GRAPH_MAX_ROWS:
            out = self._replay(arrays)
            if out is not None:
                return out
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self.stream), torch.inference_mode(), self._tf32():
            inputs = [self._staged(name, a).to(self.torch_device, non_blocking=True) for name, a in zip(INPUT_NAMES, arrays)]
            out = self.model(*inputs)
            host = self._pinned(OUTPUT_NAME, tuple(out.shape), torch.float32)
            host.copy_(out, non_blocking=True)
            self.stream.synchronize()  # the pinned buffers are reused by the next call
        return host.numpy().copy()

    def _replay(self, arrays: list[np.ndarray]) -> np.ndarray | None:
        """The batch through its bucket's CUDA graph (captured on first use), or None once a capture failed."""
        torch = self.torch
        rows = arrays[0].shape[0]
        key = graph_bucket(rows, arrays[0].shape[1], self.max_length)
        padded = pad_to_bucket(arrays, *key)
        with torch.cuda.device(self.torch_device), torch.cuda.stream(self.stream), torch.inference_mode(), self._tf32():
            entry = self.graphs.get(key)
            if entry is None:
                try:
                    entry = self.graphs[key] = self._capture(key)
                except Exception as exc:  # torch raises RuntimeError subclasses of its own for capture errors
                    self.graph_error = f"capture of {key[0]} x {key[1]} failed: {type(exc).__name__}: {exc}"
                    torch.cuda.synchronize(self.torch_device)
                    return None
            for i, (static, a) in enumerate(zip(entry.inputs, padded)):
                static.copy_(self._staged(f"graph:{i}", a), non_blocking=True)
            entry.graph.replay()
            host = self._pinned("graph:out", tuple(entry.output.shape), torch.float32)
            host.copy_(entry.output, non_blocking=True)
            self.stream.synchronize()
        self.graph_replays += 1
        return host.numpy()[:rows].copy()

    def _capture(self, key: tuple[int, int]) -> _Graph:
        torch = self.torch
        rows, length = key
        inputs = [torch.zeros(key, dtype=torch.int64, device=self.torch_device), torch.zeros(key, dtype=torch.int64, device=self.torch_device),
                  torch.zeros(rows, dtype=torch.int64, device=self.torch_device)]
        inputs[1][:, 0] = 1
        for _ in range(2):  # warm-up on the capture stream, as capturing requires
            self.model(*inputs)
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool, stream=self.stream, capture_error_mode="relaxed"):
            output = self.model(*inputs)
        return _Graph(graph, inputs, output)

    def graph_stats(self) -> dict[str, Any]:
        """Which buckets were captured, how many calls replayed one, and why graphs are off if a capture failed."""
        return {"enabled": self.cuda_graphs, "buckets": sorted(f"{r}x{n}" for r, n in self.graphs), "replays": self.graph_replays,
                "error": self.graph_error}

    def _pinned(self, key: str, shape: tuple[int, ...], dtype: Any) -> Any:
        """A view of shape ``shape`` into this key's pinned host buffer (grown when too small)."""
        count = int(np.prod(shape))
        buffer = self.pinned.get(key)
        if buffer is None or buffer.numel() < count:
            size = max(count, 2 * buffer.numel() if buffer is not None else 0)
            buffer = self.pinned[key] = self.torch.empty(size, dtype=dtype, pin_memory=True)
        return buffer[:count].view(shape)

    def _staged(self, key: str, array: np.ndarray) -> Any:
        host = self._pinned(key, array.shape, self.torch.int64)
        host.copy_(self.torch.from_numpy(array))
        return host

    @contextmanager
    def _tf32(self) -> Iterator[None]:
        if not self.tf32:
            yield
            return
        before = self.torch.get_float32_matmul_precision()
        self.torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            self.torch.set_float32_matmul_precision(before)

    def close(self) -> None:
        self.graphs.clear()
        self.model = None
        self.pinned.clear()
