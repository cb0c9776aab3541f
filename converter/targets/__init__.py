"""Deployment targets: what a target is (`base`), the registry (one line per target), each backend's
builder and runner (`onnxruntime`, `tensorrt`, `migraphx`; `runners` holds the shared runner
interface and the PyTorch reference), the recipe's `engine` section, and the checks every artifact
gets (QDQ lint, TensorRT's CPU-side acceptance)."""
