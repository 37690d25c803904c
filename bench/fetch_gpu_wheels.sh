#!/usr/bin/env bash
# Download the GPU extras into .whl/ (git-ignored) so bench/gpu_check.sh can install them on a lent GPU machine,
# which has no internet. Targets that machine: CPython 3.12, manylinux x86_64, CUDA 13.
#
# What PyPI offers (checked 2026-11 with pip download):
#   tensorrt-cu13-bindings  the Python module, ~1.2 MiB per wheel: downloaded.
#   tensorrt-cu13-libs      NO binary wheel on PyPI: only a stub sdist that fetches the real wheel (libnvinfer and
#                           the builder resources, about 1-2 GiB) from pypi.nvidia.com at install time. It cannot be
#                           carried in the 64 MiB the device tool transfers; put it into .whl/ by hand if you have it.
#   onnxruntime-gpu         ~244 MiB (cp312 x86_64): also over the 64 MiB carry limit, so not fetched by default
#                           (FETCH_ORT_GPU=1 to fetch anyway).
# Usage: bench/fetch_gpu_wheels.sh   (TRT_VERSION=11.4.0.106 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
TRT_VERSION="${TRT_VERSION:-11.4.0.106}"
mkdir -p .whl
fetch() {
  "$PIP" download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .whl "$@"
}
fetch "tensorrt-cu13-bindings==${TRT_VERSION}"
if ! fetch "tensorrt-cu13-libs==${TRT_VERSION}"; then
  echo "fetch_gpu_wheels: tensorrt-cu13-libs ${TRT_VERSION} has no binary wheel on PyPI (NVIDIA hosts it on pypi.nvidia.com);" >&2
  echo "  without it TensorRT cannot be imported on the GPU machine and gpu_check.sh records the plans as skipped." >&2
fi
if [[ "${FETCH_ORT_GPU:-0}" == 1 ]]; then
  fetch onnxruntime-gpu
fi
du -ch .whl/*.whl | tail -1
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
if (( total > 64 * 1024 * 1024 )); then
  echo "fetch_gpu_wheels: .whl/ holds $((total / 1048576)) MiB, over the 64 MiB the device tool carries" >&2
fi
