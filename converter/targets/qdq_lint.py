"""QDQ lint: does a quantized ONNX graph follow TensorRT's explicit-quantization rules?

TensorRT builds INT8 kernels only from Q/DQ graphs it can reason about:
  * int8, symmetric: every zero point is an int8 initializer of zeros (uint8 or a non-zero point
    means asymmetric quantization, which TensorRT rejects);
  * scales are constant, finite and strictly positive (a 0 scale divides by zero);
  * weights per output channel: a per-channel DequantizeLinear feeding a MatMul's B input (K, N)
    must use the last axis, a Gemm's B the axis its transB makes the output one;
  * activations per tensor (one scale), and every QuantizeLinear is consumed by a DequantizeLinear;
  * biases are not quantized (no DQ into an Add bias after a MatMul, no int32 quantized tensors);
  * an opset the TensorRT ONNX parser supports (per-axis Q/DQ needs 13 or newer).
Every problem is reported with the node's name so it can be found in the graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from converter.errors import UserError

SUPPORTED_OPSETS = (13, 22)  # inclusive range the TensorRT 10/11 ONNX parsers accept for Q/DQ graphs
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class LintIssue:
    node: str
    rule: str
    message: str


@dataclass
class LintReport:
    """Outcome of `lint_qdq`: `issues` is empty when the graph follows every rule."""

    opset: int
    quantize_nodes: int
    dequantize_nodes: int
    issues: list[LintIssue] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.issues

    def to_dict(self) -> dict:
        return {"passed": self.passed, "opset": self.opset, "quantize_nodes": self.quantize_nodes,
                "dequantize_nodes": self.dequantize_nodes, "issues": [asdict(i) for i in self.issues]}

    def summary(self, limit: int = 3) -> str:
        """One line naming the first offending nodes."""
        shown = "; ".join(f"{i.node}: {i.message}" for i in self.issues[:limit])
        more = f" (+{len(self.issues) - limit} more)" if len(self.issues) > limit else ""
        return f"{len(self.issues)} TensorRT QDQ rule violation(s): {shown}{more}"


class _Graph:
    """Constants (initializers and Constant nodes), producers and consumers of one graph."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path):
        graph = model.graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.base_dir = base_dir

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is a constant, else None (loads external data of small tensors only)."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name], base_dir=str(self.base_dir))
        node = self.constant_nodes.get(name)
        if node is not None:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def elem_type(self, name: str) -> int | None:
        if name in self.initializers:
            return self.initializers[name].data_type
        return None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _check_scale_and_zero_point(g: _Graph, node: onnx.NodeProto) -> list[LintIssue]:
    issues = []
    scale = g.constant(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        return [LintIssue(node.name, "constant_scale", f"scale {node.input[1]!r} is not a constant initializer")]
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        bad = scale[~(np.isfinite(scale) & (scale > 0))] if scale.ndim else scale
        issues.append(LintIssue(node.name, "positive_scale",
                                f"scale {node.input[1]!r} must be finite and > 0, has {np.asarray(bad).ravel()[:3].tolist()}"))
    if len(node.input) < 3 or not node.input[2]:
        issues.append(LintIssue(node.name, "int8_zero_point",
                                "no zero point: ONNX then quantizes to uint8 (asymmetric); expected an int8 zero point of 0"))
        return issues
    zero_point = g.constant(node.input[2])
    if zero_point is None:
        issues.append(LintIssue(node.name, "int8_zero_point", f"zero point {node.input[2]!r} is not a constant"))
    elif zero_point.dtype != np.int8:
        issues.append(LintIssue(node.name, "int8_zero_point", f"zero point {node.input[2]!r} is {zero_point.dtype}, expected int8"))
    elif np.any(zero_point != 0):
        issues.append(LintIssue(node.name, "symmetric", f"zero point {node.input[2]!r} is not 0 "
                                f"(values {np.unique(zero_point)[:3].tolist()}): asymmetric quantization"))
    if zero_point is not None and np.shape(zero_point) != np.shape(scale):
        issues.append(LintIssue(node.name, "zero_point_shape",
                                f"zero point shape {np.shape(zero_point)} differs from scale shape {np.shape(scale)}"))
    return issues


def _weight_output_axis(consumer: onnx.NodeProto, input_index: int, rank: int) -> int | None:
    """The output-channel axis of a weight fed to `consumer`, or None if it is not a weight input."""
    if consumer.op_type == "MatMul" and input_index == 1:
        return rank - 1  # B is (..., K, N): N output channels
    if consumer.op_type == "Gemm" and input_index == 1:
        return 0 if _attr(consumer, "transB", 0) else 1
    if consumer.op_type in ("Conv", "ConvTranspose") and input_index == 1:
        return 0 if consumer.op_type == "Conv" else 1
    return None


def _weight_uses(g: _Graph, node: onnx.NodeProto) -> list[tuple[onnx.NodeProto, int]]:
    """(consumer, input index) pairs the dequantized weight reaches: past the DQ for a Q node
    (a float weight quantized inside the graph), the DQ's own output otherwise."""
    outputs = [node.output[0]]
    if node.op_type == "QuantizeLinear":
        outputs = [dq.output[0] for dq in g.consumers.get(node.output[0], []) if dq.op_type == "DequantizeLinear"]
    return [(c, list(c.input).index(o)) for o in outputs for c in g.consumers.get(o, [])]


def _check_granularity(g: _Graph, node: onnx.NodeProto) -> list[LintIssue]:
    scale = g.constant(node.input[1])
    if scale is None or scale.size <= 1:
        return []
    data = g.constant(node.input[0])
    producer = g.producer.get(node.input[0])
    if data is None and producer is not None and producer.op_type == "QuantizeLinear":
        data = g.constant(producer.input[0])  # DQ of a weight quantized in the graph
    if data is None:  # a runtime tensor: an activation
        return [LintIssue(node.name, "per_tensor_activations",
                          f"activation {node.input[0]!r} has {scale.size} scales; TensorRT needs one per tensor")]
    axis = _attr(node, "axis", 1)
    axis = axis + data.ndim if axis < 0 else axis
    issues = []
    if data.shape[axis] != scale.size:
        issues.append(LintIssue(node.name, "per_channel_axis",
                                f"{scale.size} scales but weight dimension {axis} has {data.shape[axis]}"))
    for consumer, index in _weight_uses(g, node):
        expected = _weight_output_axis(consumer, index, data.ndim)
        if expected is not None and axis != expected:
            issues.append(LintIssue(node.name, "per_channel_axis",
                                    f"per-channel axis {axis} is not the output-channel axis {expected} of "
                                    f"{consumer.op_type} {consumer.name!r} (weight shape {list(data.shape)})"))
    return issues


def _check_dequantize_inputs(g: _Graph, node: onnx.NodeProto) -> list[LintIssue]:
    issues = []
    data = g.constant(node.input[0])
    if data is not None and data.dtype != np.int8:
        rule = "no_quantized_bias" if data.dtype == np.int32 else "int8_weights"
        issues.append(LintIssue(node.name, rule, f"quantized constant {node.input[0]!r} is {data.dtype}, expected int8"))
    if data is None:
        producer = g.producer.get(node.input[0])
        if producer is None or producer.op_type != "QuantizeLinear":
            issues.append(LintIssue(node.name, "qdq_pairs", f"input {node.input[0]!r} is neither an int8 constant "
                                    "nor the output of a QuantizeLinear"))
    for consumer in g.consumers.get(node.output[0], []):
        if consumer.op_type == "Add" and data is not None and data.ndim <= 1:
            other = [n for n in consumer.input if n != node.output[0]]
            producer = g.producer.get(other[0]) if other else None
            if producer is not None and producer.op_type in ("MatMul", "Gemm", "Conv"):
                issues.append(LintIssue(node.name, "no_quantized_bias",
                                        f"bias {node.input[0]!r} of {producer.op_type} {producer.name!r} is quantized"))
        if consumer.op_type in ("Gemm", "Conv") and list(consumer.input).index(node.output[0]) == 2:
            issues.append(LintIssue(node.name, "no_quantized_bias", f"bias of {consumer.op_type} {consumer.name!r} is quantized"))
    return issues


def _check_quantize_consumers(g: _Graph, node: onnx.NodeProto) -> list[LintIssue]:
    consumers = g.consumers.get(node.output[0], [])
    bad = [c for c in consumers if c.op_type != "DequantizeLinear"]
    if not consumers or bad:
        names = [f"{c.op_type} {c.name!r}" for c in bad] or ["nothing"]
        return [LintIssue(node.name, "qdq_pairs", f"QuantizeLinear output feeds {', '.join(names)}, expected DequantizeLinear")]
    return []


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def lint_model(model: onnx.ModelProto, base_dir: Path = Path(".")) -> LintReport:
    """Check an in-memory ONNX model against TensorRT's explicit-quantization rules.

    Args:
        model: the QDQ model (external data may stay unloaded; it is read from `base_dir` as needed).
        base_dir: folder of the model file, for external data.

    Returns:
        A report with one issue per violation, each naming its node.
    """
    g = _Graph(model, base_dir)
    opset = _opset(model)
    report = LintReport(opset=opset, quantize_nodes=0, dequantize_nodes=0)
    low, high = SUPPORTED_OPSETS
    if not low <= opset <= high:
        report.issues.append(LintIssue("(model)", "opset", f"opset {opset}; TensorRT Q/DQ needs {low}..{high}"))
    for node in model.graph.node:
        if node.op_type not in _QDQ or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "QuantizeLinear":
            report.quantize_nodes += 1
            report.issues += _check_quantize_consumers(g, node)
        else:
            report.dequantize_nodes += 1
            report.issues += _check_dequantize_inputs(g, node)
        report.issues += _check_scale_and_zero_point(g, node)
        report.issues += _check_granularity(g, node)
    if report.quantize_nodes + report.dequantize_nodes == 0:
        report.issues.append(LintIssue("(model)", "has_qdq", "no QuantizeLinear/DequantizeLinear nodes: not a QDQ model"))
    return report


def lint_qdq(path: Path) -> LintReport:
    """Lint the QDQ ONNX file at `path` (see `lint_model`).

    Raises:
        UserError: the file does not exist or is not an ONNX model.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, onnx its own types
        raise UserError(f"{path} is not an ONNX model ({type(exc).__name__})") from None
    return lint_model(model, path.parent)
