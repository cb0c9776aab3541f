"""TensorRT on CPU: build plans, the builder config on the real API, TensorRT-RTX acceptance of every
tiny architecture, and the engine inspector's JSON. GPU builds are marked `gpu` and skipped here."""

import importlib.util
import json

import numpy as np
import pytest

from converter.errors import UserError
from converter.targets.engine_options import EngineOptions
from converter.targets.tensorrt import engine_layer_precisions, make_config, plan_build, profile_shapes
from converter.targets.tensorrt_rtx import RTX_MODULE, accept
from conftest import quantized_matmuls

needs_rtx = pytest.mark.skipif(importlib.util.find_spec(RTX_MODULE) is None,
                               reason="TensorRT-RTX packages not installed (setup.sh installs them)")
OPTIONS = EngineOptions(batch={"min": 1, "opt": 2, "max": 4}, sequence={"min": 1, "opt": 64, "max": 512},
                        workspace_mb=256, builder_optimization_level=2)


def test_plan_names_the_engine_and_takes_profiles_from_the_recipe(exported):
    from converter.models.archs import arch_spec
    from converter.models.io import model_io

    _, model, _, _, int8_path, _ = exported
    inputs = model_io(arch_spec(model), model.config).inputs  # encoders add token_type_ids
    plan = plan_build("h100-tensorrt", int8_path, OPTIONS, "10.13.3")
    assert plan["planned_engine_file"] == "model.h100-tensorrt.sm90.trt10.13.3.plan"
    assert plan["timing_cache_file"] == "model.h100-tensorrt.sm90.trt10.13.3.timing.cache"
    assert plan["compute_capability"] == "9.0" and plan["gfx_arch"] is None and plan["backend"] == "tensorrt"
    assert plan["profiles"] == [{name: {"min": [1, 1], "opt": [2, 64], "max": [4, 512]}
                                 for name in inputs}]
    assert plan["workspace_bytes"] == 256 * 2**20 and plan["builder_optimization_level"] == 2
    a100 = plan_build("a100-tensorrt", int8_path, OPTIONS, "10.13.3")
    assert a100["planned_engine_file"] == "model.a100-tensorrt.sm80.trt10.13.3.plan"


def test_pinned_tensorrt_version_must_match_the_installed_one(exported):
    *_, int8_path, _ = exported
    pinned = OPTIONS.model_copy(update={"tensorrt_version": "11.4.0"})
    with pytest.raises(UserError, match="11.4.0.*10.13.3"):
        plan_build("a100-tensorrt", int8_path, pinned, "10.13.3")
    assert plan_build("a100-tensorrt", int8_path, pinned, None)["planned_engine_file"].endswith(".trt11.4.0.plan")


def test_static_axes_keep_their_exported_size(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, [1, "sequence"])])
    onnx.save(helper.make_model(graph, ir_version=10), tmp_path / "m.onnx")
    assert profile_shapes(tmp_path / "m.onnx", OPTIONS) == {"input_ids": {"min": [1, 1], "opt": [1, 64], "max": [1, 512]}}


@needs_rtx
def test_builder_config_carries_the_plan():
    import tensorrt_rtx_bindings as trt

    shapes = {"input_ids": {"min": [1, 1], "opt": [2, 64], "max": [4, 512]}}
    plan = {"workspace_bytes": 256 * 2**20, "builder_optimization_level": 2, "profiles": [shapes],
            "hardware_compatibility": "none", "version_compatible": True}
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    config, cache = make_config(trt, builder, plan)
    assert config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) == 256 * 2**20
    assert config.builder_optimization_level == 2
    assert config.get_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    assert config.num_optimization_profiles == 1
    assert config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED


@needs_rtx
def test_tensorrt_parser_and_builder_accept_every_tiny_architecture(exported):
    arch, _, plan, _, int8_path, _ = exported
    result = accept(int8_path, OPTIONS)
    assert result["passed"] and result["parsed"] and result["built"], result.get("error")
    network = result["network"]
    # every quantized linear is a MatMul whose both inputs TensorRT dequantizes from INT8
    assert sorted(network["int8_matmul_linears"]) == sorted(plan.linears)
    assert network["int8_quantize_layers"] == network["int8_matmul_layers"] == len(quantized_matmuls(int8_path))
    # acceptance builds at the profile's opt shapes (GPU engines keep min/opt/max)
    assert result["engine_bytes"] > 100_000
    assert result["profiles"][0]["input_ids"] == {"min": [2, 64], "opt": [2, 64], "max": [2, 64]}


@needs_rtx
def test_parser_failure_names_the_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # ReduceMean axes from a runtime input: TensorRT needs build-time constant axes
    graph = helper.make_graph([helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="norm/mean")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), tmp_path / "m.onnx")
    result = accept(tmp_path / "m.onnx", OPTIONS)
    assert result["passed"] is False and "norm/mean" in result["error"]


def test_inspector_precisions_from_tensorrt_10_and_11_json():
    trt10 = {"Layers": [
        {"Name": "fc1", "LayerType": "gemm", "Inputs": [{"Name": "a", "Format/Datatype": "Row major Int8 format"}],
         "Outputs": [{"Name": "b", "Format/Datatype": "Row major linear FP32"}]},
        {"Name": "softmax", "LayerType": "Softmax", "Inputs": [{"Name": "b", "Format/Datatype": "Row major linear FP16 format"}],
         "Outputs": [{"Name": "c", "Format/Datatype": "Row major linear FP16 format"}]},
    ], "Bindings": ["a", "c"]}
    trt11 = {"Layers": [
        {"Name": "q", "Inputs": [{"Name": "x", "DataType": "Float", "Format": "kLINEAR"}],
         "Outputs": [{"Name": "y", "DataType": "Int8", "Format": "kLINEAR"}]},
        {"Name": "mm", "Inputs": [{"Name": "y", "DataType": "Int8"}], "Outputs": [{"Name": "z", "DataType": "Half"}]},
        {"Name": "out", "Inputs": [{"Name": "z", "DataType": "Half"}], "Outputs": [{"Name": "o", "DataType": "Float"}]},
    ], "I/O Tensors": []}
    ten = engine_layer_precisions(json.dumps(trt10))
    assert ten["engine_layers"] == 2 and ten["int8_layers"] == 1 and ten["int8_layer_names"] == ["fc1"]
    assert ten["layer_precisions"] == {"int8": 1, "fp16": 1}
    eleven = engine_layer_precisions(json.dumps(trt11))
    assert eleven["int8_layers"] == 2 and eleven["layer_precisions"] == {"fp32": 1, "int8": 1, "fp16": 1}


def gpu_parity_feed(model, batch: int, sequence: int) -> tuple[dict, str]:
    """(feed, output name) of the GPU parity tests: the model's own graph inputs (BERT-like encoders add
    token_type_ids) and output (`last_hidden_state` for a bare encoder, else `logits`), from `ModelIO`."""
    import torch

    from converter.models.archs import arch_spec
    from converter.models.io import model_io

    io = model_io(arch_spec(model), model.config)
    ids = torch.arange(batch * sequence).reshape(batch, sequence) % 300
    return io.feed(ids, torch.ones_like(ids)), io.output


def test_gpu_parity_feed_runs_on_onnxruntime(exported):
    """The ONNX Runtime half of the GPU parity tests below, for every family: the feed holds exactly
    the graph's inputs and the output name is one the graph has."""
    from converter.export.kv_graph import graph_io_names
    from converter.targets.runners import onnxruntime_runner

    _, model, _, _, int8_path, _ = exported
    feed, output = gpu_parity_feed(model, 2, 32)
    inputs, outputs = graph_io_names(int8_path)
    assert sorted(feed) == sorted(inputs) and output in outputs
    with onnxruntime_runner(int8_path) as ort_run:
        result = np.asarray(ort_run.infer(feed)[output])
    assert result.shape[0] == 2 and np.isfinite(result).all()


def _gpu_available(module: str) -> bool:
    from converter.targets.registry import TARGETS

    name = "a100-tensorrt" if module == "tensorrt" else "mi250x-migraphx"
    return TARGETS[name].availability()[0]


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available("tensorrt"), reason="needs TensorRT and an NVIDIA GPU")
def test_tensorrt_engine_matches_onnxruntime_on_gpu(exported, tmp_path):
    import shutil

    from converter.targets.runners import onnxruntime_runner
    from converter.targets.tensorrt import build_engine, device_compute_capability, tensorrt_runner

    _, torch_model, _, _, int8_path, _ = exported
    model = tmp_path / "v1" / "model.onnx"
    model.parent.mkdir()
    shutil.copy(int8_path, model)
    target = "h100-tensorrt" if device_compute_capability() == "9.0" else "a100-tensorrt"
    options = OPTIONS.model_copy(update={"hardware_compatibility": "ampere_plus"})
    report = build_engine(target, model, options)
    assert (model.parent / report["engine_file"]).stat().st_size > 0
    assert (model.parent / report["timing_cache_file"]).is_file()
    assert report["network"]["int8_matmul_layers"] > 0
    feed, output = gpu_parity_feed(torch_model, 2, 32)
    with tensorrt_runner(model.parent / report["engine_file"]) as trt_run, onnxruntime_runner(model) as ort_run:
        trt_out, ort_out = trt_run.infer(feed)[output], ort_run.infer(feed)[output]
    assert np.mean(np.abs(trt_out - ort_out)) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available("migraphx"), reason="needs MIGraphX and an AMD GPU")
def test_migraphx_program_matches_onnxruntime_on_gpu(exported, tmp_path):
    import shutil

    from converter.targets.migraphx import MigraphxRunner, build_program, visible_gfx_archs
    from converter.targets.runners import onnxruntime_runner

    _, torch_model, _, _, int8_path, _ = exported
    model = tmp_path / "model.onnx"
    shutil.copy(int8_path, model)
    target = "mi300-migraphx" if "gfx942" in visible_gfx_archs() else "mi250x-migraphx"
    report = build_program(target, model, OPTIONS)
    feed, output = gpu_parity_feed(torch_model, 2, 64)  # the program's compiled size: OPTIONS batch/sequence opt
    with MigraphxRunner(tmp_path / report["engine_file"], model) as mgx, onnxruntime_runner(model) as ort_run:
        assert np.mean(np.abs(mgx.infer(feed)[output] - ort_run.infer(feed)[output])) < 0.05
