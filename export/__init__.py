"""Checkpoint -> ONNX / TensorRT engine bundles, each verified against PyTorch."""
