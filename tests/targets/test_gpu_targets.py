"""The TensorRT and MIGraphX code paths, run on CPU through test doubles of their Python modules
(tests/targets/fakes). What is checked is our control flow: which calls are made with which values, what is
written where, what is refused. Whether the real libraries build working engines is not (that needs
the GPUs; see the `gpu`-marked tests in test_tensorrt.py)."""

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from polygraphy.exception import PolygraphyException

from converter.errors import UserError
from converter.targets.engine_options import EngineOptions, PastRange

OPTIONS = EngineOptions(batch={"min": 1, "opt": 2, "max": 4}, sequence={"min": 1, "opt": 64, "max": 512},
                        workspace_mb=256, builder_optimization_level=2)
INT64, FLOAT = TensorProto.INT64, TensorProto.FLOAT


def _save(path, nodes, inputs, outputs):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, d) for n, (t, d) in inputs.items()],
                              [helper.make_tensor_value_info(n, t, d) for n, (t, d) in outputs.items()])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    return path


def encoder_graph(path, mask_type=INT64):
    """input_ids, token_type_ids (int64) and attention_mask -> last_hidden_state = (ids + types) * mask."""
    bs = ["batch", "sequence"]
    nodes = [helper.make_node("Cast", ["input_ids"], ["a"], to=FLOAT),
             helper.make_node("Cast", ["token_type_ids"], ["t"], to=FLOAT),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=FLOAT),
             helper.make_node("Add", ["a", "t"], ["at"]), helper.make_node("Mul", ["at", "m"], ["last_hidden_state"])]
    return _save(path, nodes, {"input_ids": (INT64, bs), "attention_mask": (mask_type, bs), "token_type_ids": (INT64, bs)},
                 {"last_hidden_state": (FLOAT, bs)})


def kv_graph(path, heads=2, head_dim=4):
    """The KV-cache decoder signature: ids (batch, sequence), mask (batch, past + sequence), one layer's
    past key/value (batch, heads, past, head_dim) in, logits and present key/value out."""
    past = ["batch", heads, "past_sequence", head_dim]
    nodes = [helper.make_node("Cast", ["input_ids"], ["logits"], to=FLOAT),
             helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
             helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"])]
    return _save(path, nodes, {"input_ids": (INT64, ["batch", "sequence"]), "attention_mask": (INT64, ["batch", "total"]),
                               "past_key_values.0.key": (FLOAT, past), "past_key_values.0.value": (FLOAT, past)},
                 {"logits": (FLOAT, ["batch", "sequence"]), "present.0.key": (FLOAT, None),
                  "present.0.value": (FLOAT, None)})


# ---------------------------------------------------------------------------------------------- TensorRT

@pytest.fixture
def fake_trt(monkeypatch):
    from fakes import tensorrt

    tensorrt.reset()
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt)
    # the network of one QDQ linear `fc`, as TensorRT's parser lays it out (weight DQ, then a SHUFFLE)
    i8, f32 = tensorrt.int8, tensorrt.float32
    tensorrt.LAYERS[:] = [
        ("fc/input_quantize", tensorrt.LayerType.QUANTIZE, [("x", f32)], [("xq", i8)]),
        ("fc/input_dequantize", tensorrt.LayerType.DEQUANTIZE, [("xq", i8)], [("xdq", f32)]),
        ("w", tensorrt.LayerType.CONSTANT, [], [("w_q", i8)]),
        ("fc/weight_dequantize", tensorrt.LayerType.DEQUANTIZE, [("w_q", i8)], [("wdq", f32)]),
        ("broadcast", tensorrt.LayerType.SHUFFLE, [("wdq", f32)], [("wdq3", f32)]),
        ("fc/matmul", tensorrt.LayerType.MATRIX_MULTIPLY, [("xdq", f32), ("wdq3", f32)], [("y", f32)]),
    ]
    tensorrt.INSPECTOR_LAYERS[:] = [{"Name": "fc", "Inputs": [{"Name": "xq", "DataType": "Int8"}],
                                     "Outputs": [{"Name": "y", "DataType": "Float"}]}]
    return tensorrt


@pytest.fixture
def gpu(monkeypatch):
    """gpu("8.0"): CUDA device 0 has that compute capability; gpu(None): no device."""
    from fakes.cudart import FakeCuda
    from polygraphy import cuda

    def install(compute_capability):
        fake = FakeCuda(compute_capability)
        monkeypatch.setattr(cuda, "wrapper", lambda: fake)
        return fake.handle

    return install


def _calls(fake, name):
    return [c[1:] for c in fake.CALLS if c[0] == name]


def test_build_engine_passes_the_plan_to_tensorrt_and_names_the_engine(fake_trt, gpu, tmp_path):
    from converter.targets.tensorrt import build_engine

    handle = gpu("8.0")
    model = encoder_graph(tmp_path / "bert-w8a8" / "1" / "model.onnx")
    report = build_engine("a100-tensorrt", model, OPTIONS)
    assert handle.calls == [(75, 0), (76, 0)]  # compute capability major, minor of device 0
    assert report["engine_file"] == "model.a100-tensorrt.sm80.trt10.13.3.plan"
    engine = json.loads((model.parent / report["engine_file"]).read_bytes())
    assert _calls(fake_trt, "create_network") == [(1 << 1,)]  # STRONGLY_TYPED
    assert _calls(fake_trt, "parse_from_file") == [(str(model),)]
    profile = {"min": [1, 1], "opt": [2, 64], "max": [4, 512]}
    assert engine["profiles"] == [{name: [profile["min"], profile["opt"], profile["max"]]
                                   for name in ("input_ids", "attention_mask", "token_type_ids")}]
    assert engine["workspace"] == 256 * 2**20 and engine["builder_optimization_level"] == 2
    assert engine["profiling_verbosity"] == "DETAILED" and engine["hardware_compatibility_level"] == "NONE"
    assert engine["flags"] == [] and _calls(fake_trt, "deserialize_cuda_engine") == [(False,)]
    assert report["network"]["int8_matmul_linears"] == ["fc"] and report["network"]["int8_quantize_layers"] == 1
    assert report["int8_layer_names"] == ["fc"]


def test_network_is_summarized_while_its_parser_is_alive(fake_trt, gpu, tmp_path):
    """TensorRT's parser owns the network's weights: reading the network after `del parser` is a
    use-after-free, which the double turns into a RuntimeError."""
    from converter.targets.tensorrt import build_engine

    gpu("8.0")
    report = build_engine("a100-tensorrt", encoder_graph(tmp_path / "m" / "1" / "model.onnx"), OPTIONS)
    assert report["network"]["layers"] == 6 and report["network"]["int8_matmul_layers"] == 1


def test_second_build_reuses_the_first_builds_timing_cache(fake_trt, gpu, tmp_path):
    from converter.targets.tensorrt import build_engine

    gpu("9.0")
    first = build_engine("h100-tensorrt", encoder_graph(tmp_path / "m" / "1" / "model.onnx"), OPTIONS)
    cache_file = "model.h100-tensorrt.sm90.trt10.13.3.timing.cache"
    assert first["timing_cache_file"] == cache_file and first["timing_cache_reused"] is False
    saved = (tmp_path / "m" / "1" / cache_file).read_bytes()
    assert json.loads(saved) == ["build 1"]
    second = build_engine("h100-tensorrt", encoder_graph(tmp_path / "m" / "2" / "model.onnx"), OPTIONS)
    assert second["timing_cache_reused"] is True
    assert _calls(fake_trt, "create_timing_cache") == [(b"",), (saved,)]  # the second build loaded the first's cache
    assert _calls(fake_trt, "set_timing_cache") == [(False,), (False,)]
    assert json.loads((tmp_path / "m" / "2" / cache_file).read_bytes()) == ["build 1", "build 2"]


def test_engine_for_another_compute_capability_is_refused(fake_trt, gpu, tmp_path):
    from converter.targets.tensorrt import build_engine

    model = encoder_graph(tmp_path / "m" / "1" / "model.onnx")
    gpu("8.0")  # an A100
    with pytest.raises(UserError, match="compute capability 8.0, the target needs 9.0"):
        build_engine("h100-tensorrt", model, OPTIONS)
    gpu(None)
    with pytest.raises(UserError, match="no CUDA GPU visible"):
        build_engine("a100-tensorrt", model, OPTIONS)
    assert _calls(fake_trt, "build_serialized_network") == [] and not list(model.parent.glob("*.plan"))
    gpu("8.0")  # hardware compatibility: an Ampere-built engine that also runs on the H100
    compatible = OPTIONS.model_copy(update={"hardware_compatibility": "ampere_plus", "version_compatible": True})
    report = build_engine("h100-tensorrt", model, compatible)
    engine = json.loads((model.parent / report["engine_file"]).read_bytes())
    assert engine["hardware_compatibility_level"] == "AMPERE_PLUS" and engine["flags"] == ["VERSION_COMPATIBLE"]
    assert _calls(fake_trt, "deserialize_cuda_engine") == [(True,)]  # a version-compatible plan embeds its runtime


def test_parser_errors_name_every_failing_node(fake_trt, gpu, tmp_path):
    from converter.targets.tensorrt import TensorRTParseError, build_engine

    gpu("8.0")
    fake_trt.PARSE_ERRORS[:] = [{"node_name": "norm/mean", "node": 3, "node_operator": "ReduceMean", "desc": "axes"},
                                {"node_name": "", "node": 7, "node_operator": "Gather", "desc": "index"}]
    with pytest.raises(TensorRTParseError, match=r"node norm/mean \(ReduceMean\): axes; node 7 \(Gather\): index"):
        build_engine("a100-tensorrt", encoder_graph(tmp_path / "m" / "1" / "model.onnx"), OPTIONS)


def test_tensorrt_build_report_lists_linears_the_network_did_not_quantize(fake_trt, gpu, tmp_path):
    from converter.quant.quantize import QuantPlan
    from converter.targets.registry import TARGETS

    gpu("8.0")
    plan = QuantPlan(linears={"fc": None, "fc2": None}, excluded=[])
    model = encoder_graph(tmp_path / "m" / "1" / "model.onnx")
    report = TARGETS["a100-tensorrt"].build("a100-tensorrt", model, tmp_path, plan, engine=OPTIONS)
    assert report.fused_linears == 1 and report.unfused_linears == ["fc2"]  # the pipeline refuses this build


def _in_profile(profile: dict, feed: dict) -> list[str]:
    """Inputs of `feed` whose shape lies outside the profile's [min, max] (or that it lacks)."""
    misses = [f"{name}: not in the profile" for name in feed if name not in profile]
    for name, shape in profile.items():
        dims = np.shape(feed[name])
        if len(dims) != len(shape["min"]) or not all(lo <= d <= hi for d, lo, hi in zip(dims, shape["min"], shape["max"])):
            misses.append(f"{name}: {dims} outside {shape['min']}..{shape['max']}")
    return misses


def test_profile_covers_every_feed_of_kv_cache_parity(tmp_path):
    """Parity's feeds on a KV-cache graph: evaluation windows (prefill, empty past), then generation's
    prefill and one-token decode steps over a growing past. Each must lie in the engine's profile."""
    from converter.export.kv_graph import graph_kv_layout
    from converter.parity.generation import greedy_graph
    from converter.targets.tensorrt import profile_shapes

    model = kv_graph(tmp_path / "model.onnx")
    layout = graph_kv_layout(model)
    options = OPTIONS.model_copy(update={"past_sequence": PastRange(min=0, opt=64, max=512)})
    profile = profile_shapes(model, options)
    feeds = [{"input_ids": np.zeros((2, 64), np.int64), "attention_mask": np.ones((2, 64), np.int64),
              **layout.empty_past(2)}]

    def step(feed):  # logits (1, T, V) and presents of past + T tokens, as the graph returns them
        feeds.append(feed)
        total = feed["attention_mask"].shape[1]
        present = np.zeros((1, layout.kv_heads, total, layout.head_dim), np.float32)
        return {"logits": np.zeros((1, feed["input_ids"].shape[1], 8), np.float32),
                "present.0.key": present, "present.0.value": present}

    assert len(list(greedy_graph(step, layout, list(range(32)), 32))) == 32
    assert [np.shape(f["past_key_values.0.key"])[2] for f in feeds[1:4]] == [0, 32, 33]
    assert [m for f in feeds for m in _in_profile(profile, f)] == []
    no_prefill = profile_shapes(model, options.model_copy(update={"past_sequence": PastRange(min=1, opt=64, max=512)}))
    assert _in_profile(no_prefill, feeds[0]) == ["past_key_values.0.key: (2, 2, 0, 4) outside [1, 2, 1, 4]..[4, 2, 512, 4]",
                                                 "past_key_values.0.value: (2, 2, 0, 4) outside [1, 2, 1, 4]..[4, 2, 512, 4]"]


# ---------------------------------------------------------------------------------------------- MIGraphX

@pytest.fixture
def fake_migraphx(monkeypatch):
    from fakes import migraphx

    from converter.targets import migraphx as ours

    migraphx.reset()
    monkeypatch.setitem(sys.modules, "migraphx", migraphx)
    monkeypatch.setattr(ours, "visible_gfx_archs", lambda: ["gfx90a"])
    return migraphx


# What MIGraphX prints for a compiled program: parameters, literals, MLIR-fused kernels, a return.
LISTING = """module: "main"
@0 = @param:input_ids -> int64_type, {2, 64}, {64, 1}
@1 = @literal{ ... } -> int8_type, {64, 64}, {64, 1}
main:@2 = gpu::code_object[code_object=8920,symbol_name=mlir_quant_dot_add,global=1024,local=256,](@0,@1) -> float_type, {2, 64, 64}
main:@3 = gpu::code_object[code_object=8920,symbol_name=mlir_quant_dot,global=1024,local=256,](@2,@1) -> int32_type, {2, 64, 64}
main:@4 = gpu::code_object[code_object=4100,symbol_name=mlir_dot,global=512,local=256,](@3,@1) -> float_type, {2, 64, 64}
@5 = gpu::quant_gemm[int8_x4_format=0,compute_fp32=1](@0,@1,@4) -> int32_type, {2, 64, 64}, {4096, 64, 1}
@6 = @return(@5)
"""


def test_migraphx_build_compiles_at_the_recipe_sizes_and_counts_int8_instructions(fake_migraphx, tmp_path):
    from converter.artifact.package import int8_linears_text
    from converter.quant.quantize import QuantPlan
    from converter.targets.registry import TARGETS

    fake_migraphx.LISTING = LISTING
    model = encoder_graph(tmp_path / "model.onnx")
    plan = QuantPlan(linears={"fc": None}, excluded=[])
    report = TARGETS["mi250x-migraphx"].build("mi250x-migraphx", model, tmp_path, plan, engine=OPTIONS)
    dims = {name: [2, 64] for name in ("input_ids", "attention_mask", "token_type_ids")}
    assert _calls(fake_migraphx, "parse_onnx") == [(str(model), dims)]
    assert _calls(fake_migraphx, "compile") == [("gpu", True, False, False)]  # offload_copy, fast_math off
    assert _calls(fake_migraphx, "save") == [(str(tmp_path / "model.mi250x-migraphx.gfx90a.b2s64.mxr"), "msgpack")]
    # which linears run in int8 is unknown (instructions carry no ONNX names); the int8 dots are counted
    assert report.fused_linears is None and report.unfused_linears is None
    assert report.details["program_ops"] == {"@literal": 1, "@param": 1, "@return": 1, "gpu::quant_gemm": 1,
                                             "mlir_dot": 1, "mlir_quant_dot": 1, "mlir_quant_dot_add": 1}
    assert report.details["int8_dot_instructions"] == 3 and report.int8_kernels == {"int8 dot instructions": 3}
    assert int8_linears_text(report.to_dict()) == ("int8 linears: unknown (the backend does not map its instructions "
                                                   "to linears; its compiled program holds 3 int8 dot instructions)")


def test_migraphx_runner_feeds_the_graphs_dtypes_and_names_its_outputs(fake_migraphx, tmp_path):
    from converter.quant.quantize import QuantPlan
    from converter.targets.registry import TARGETS
    from converter.targets.runners import onnxruntime_runner

    model = encoder_graph(tmp_path / "model.onnx", mask_type=FLOAT)  # a float mask, as some exporters write it
    target = TARGETS["mi250x-migraphx"]
    runner = target.runner(model, target.build(target.name, model, tmp_path, QuantPlan({}, []), engine=OPTIONS))
    ids = np.arange(128, dtype=np.int64).reshape(2, 64)
    feed = {"input_ids": ids, "attention_mask": np.ones((2, 64), np.float32), "token_type_ids": ids % 2}
    with runner, onnxruntime_runner(model) as ort_run:
        meta = runner.get_input_metadata()
        assert {name: np.dtype(meta[name].dtype) for name in meta} == {
            "input_ids": np.int64, "attention_mask": np.float32, "token_type_ids": np.int64}
        out = runner.infer(feed)
        assert list(out) == ["last_hidden_state"]
        np.testing.assert_array_equal(out["last_hidden_state"], ort_run.infer(feed)["last_hidden_state"])
        short = {name: value[:, :32] for name, value in feed.items()}
        with pytest.raises(PolygraphyException, match=r"input_ids \| Received incompatible shape: \(2, 32\)"):
            runner.infer(short)  # the program was compiled for (2, 64)


def test_migraphx_refuses_a_kv_cache_graph(fake_migraphx, tmp_path):
    from converter.targets.migraphx import build_program, plan_build

    model = kv_graph(tmp_path / "model.onnx")
    with pytest.raises(UserError, match="mi300-migraphx: MIGraphX compiles one fixed input shape per program"):
        plan_build("mi300-migraphx", model, OPTIONS)
    with pytest.raises(UserError, match="export.kv_cache: false"):
        build_program("mi250x-migraphx", model, OPTIONS)
    assert fake_migraphx.CALLS == []


def test_recipe_refuses_migraphx_with_a_kv_cache(write_recipe, tmp_path):
    from conftest import tiny_recipe_dict

    from converter.recipe import load_recipe

    data = {**tiny_recipe_dict(tmp_path / "ckpt"), "targets": ["cpu-onnxruntime", "mi300-migraphx"],
            "export": {"kv_cache": True}}
    with pytest.raises(UserError, match=r"mi300-migraphx: MIGraphX compiles one fixed input shape per program and a "
                                        r"KV-cache graph's past grows every decode step; use export.kv_cache: false"):
        load_recipe(write_recipe(data))
    assert load_recipe(write_recipe({**data, "export": {"kv_cache": False}})).recipe.targets[1] == "mi300-migraphx"
    assert load_recipe(write_recipe({**data, "targets": ["h100-tensorrt"]})).recipe.export.kv_cache is True


def test_migraphx_with_generation_parity_is_refused_before_any_work():
    """Generation parity re-runs a growing sequence: a fixed-shape MIGraphX program cannot take it, and
    the load stage says so before calibration and export. A dry run only plans GPU targets (no parity
    runs), so it goes on."""
    from converter.pipeline import _refuse_fixed_shape_generation

    with pytest.raises(UserError, match=r"mi300-migraphx: .*parity.generation.enabled: false"):
        _refuse_fixed_shape_generation(["cpu-onnxruntime", "mi300-migraphx"], True, dry_run=False)
    _refuse_fixed_shape_generation(["mi300-migraphx"], False, dry_run=False)  # generation off, or an encoder
    _refuse_fixed_shape_generation(["mi300-migraphx"], True, dry_run=True)
    _refuse_fixed_shape_generation(["cpu-onnxruntime", "h100-tensorrt"], True, dry_run=False)
