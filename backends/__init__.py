"""Backends that turn an optimized ONNX model into something that runs on a target."""
