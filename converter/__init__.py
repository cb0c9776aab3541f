"""HF checkpoint -> SmoothQuant -> W8A8 QDQ ONNX -> per-target INT8 artifacts with parity reports."""

__version__ = "0.1.0"
