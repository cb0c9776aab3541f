"""The QDQ lint accepts what the exporter writes and names the node of every broken rule."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.targets.qdq_lint import lint_model, lint_qdq
from conftest import qdq_matmul_model, quantized_matmuls


def _qdq_matmul(*, act_zero_point=0, weight_scale=None, weight_axis=1, act_scales=1, opset=18) -> onnx.ModelProto:
    """x (1, 6) -> Q/DQ -> MatMul with DQ(int8 W (6, 4), per-channel scales) -> y (1, 4)."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (6, 4)).astype(np.int8)
    w_scale = np.full(4, 0.02, np.float32) if weight_scale is None else np.asarray(weight_scale, np.float32)
    x_scale = np.full(act_scales, 0.05, np.float32) if act_scales > 1 else np.array(0.05, np.float32)
    return qdq_matmul_model(w, w_scale, x_scale, x_zero_point=act_zero_point, weight_axis=weight_axis,
                            x_shape=[1, 6], opset=opset)


def test_well_formed_graph_passes():
    report = lint_model(_qdq_matmul())
    assert report.passed, report.issues
    assert (report.quantize_nodes, report.dequantize_nodes) == (1, 2)


@pytest.mark.parametrize("broken, node, rule", [
    (dict(act_zero_point=3), "fc/input_quantize", "symmetric"),
    (dict(weight_scale=[0.02, 0.0, 0.02, 0.02]), "fc/weight_dequantize", "positive_scale"),
    (dict(weight_scale=[0.02] * 6, weight_axis=0), "fc/weight_dequantize", "per_channel_axis"),
    (dict(act_scales=6), "fc/input_quantize", "per_tensor_activations"),
    (dict(opset=11), "(model)", "opset"),
])
def test_broken_graph_is_rejected_with_the_node_named(broken, node, rule):
    report = lint_model(_qdq_matmul(**broken))
    assert not report.passed
    assert (node, rule) in {(i.node, i.rule) for i in report.issues}, report.issues
    assert node in report.summary()


def test_wrong_axis_on_a_square_weight_is_still_caught():
    # a (6, 4) weight with axis 0 also mismatches the scale count; here only the axis itself is wrong
    model = _qdq_matmul(weight_scale=[0.02] * 4)
    w = numpy_helper.from_array(np.ones((4, 4), np.int8), "w_q")
    model.graph.initializer[0].CopyFrom(w)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4
    for n in model.graph.node:
        if n.name == "fc/weight_dequantize":
            n.attribute[0].i = 0
    issues = lint_model(model).issues
    assert [(i.node, i.rule) for i in issues] == [("fc/weight_dequantize", "per_channel_axis")]


def test_quantized_bias_and_uint8_zero_point_are_rejected():
    model = _qdq_matmul()
    model.graph.initializer.extend([numpy_helper.from_array(np.ones(4, np.int32), "b_q"),
                                    numpy_helper.from_array(np.array(0.01, np.float32), "b_scale"),
                                    numpy_helper.from_array(np.array(0, np.int32), "b_zp")])
    model.graph.node.extend([helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], name="fc/bias_dq"),
                             helper.make_node("Add", ["y", "b"], ["z"], name="fc/add")])
    model.graph.output[0].name = "z"
    rules = {(i.node, i.rule) for i in lint_model(model).issues}
    assert ("fc/bias_dq", "no_quantized_bias") in rules
    model = _qdq_matmul()
    del model.graph.node[0].input[2]  # no zero point: ONNX quantizes to uint8
    assert ("fc/input_quantize", "int8_zero_point") in {(i.node, i.rule) for i in lint_model(model).issues}


def test_exported_tiny_models_pass(exported):
    arch, _, plan, _, int8_path, _ = exported
    report = lint_qdq(int8_path)
    assert report.passed, report.summary()
    matmuls = len(quantized_matmuls(int8_path))
    assert report.quantize_nodes == matmuls and report.dequantize_nodes == 2 * matmuls


@pytest.mark.parametrize("axis, ok", [(1, True), (0, False)])
def test_float_weight_quantized_in_graph_is_checked_past_its_dequantize(axis, ok):
    inits = [numpy_helper.from_array(np.ones((4, 4), np.float32), "w"),
             numpy_helper.from_array(np.full(4, 0.02, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["wq"], name="w/quantize", axis=axis),
             helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wdq"], name="w/dequantize", axis=axis),
             helper.make_node("MatMul", ["x", "wdq"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    issues = {(i.node, i.rule) for i in lint_model(model).issues}
    assert issues == (set() if ok else {("w/quantize", "per_channel_axis"), ("w/dequantize", "per_channel_axis")})
