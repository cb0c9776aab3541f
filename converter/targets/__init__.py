"""Deployment targets: the registry, each backend's build and runner (ONNX Runtime, TensorRT,
MIGraphX), the recipe's `engine` section, and the checks every artifact gets (QDQ lint, TensorRT's
CPU-side acceptance)."""
