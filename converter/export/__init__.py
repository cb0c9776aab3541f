"""Export: the FP32 ONNX graph, QDQ insertion, the KV-cache graph and its I/O names, grouped-query
attention for export, and ONNX Runtime's fused attention."""
