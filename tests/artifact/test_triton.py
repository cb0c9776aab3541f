"""Triton repositories: configs parse strictly with ModelConfig and match the exported graph's I/O."""

import json
import shutil

import onnx
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from conftest import tiny_recipe_dict
from converter.artifact.package import write_manifest
from converter.artifact.triton import TritonConfigError, parse_config
from runcli import NAME, run_cli

BUILD = 7
CPU_MODEL = f"{NAME}-cpu-onnxruntime"
TRT_MODEL = f"{NAME}-tensorrt"
ONNX_TO_TRITON = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}


@pytest.fixture(scope="module")
def artifact(tiny_checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_checkpoints["llama"])))
    code, _, stderr = run_cli(recipe, "--output-dir", tmp / "out", "--quiet", "--build-number", BUILD)
    assert code == 0, stderr
    return tmp / "out" / NAME / f"1-build{BUILD}"


def graph_io(path):
    """The graph's I/O read directly with onnx: name -> (Triton type, dims without the batch axis)."""
    graph = onnx.load(str(path)).graph
    out = {}
    for value in (*graph.input, *graph.output):
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        assert dims[0] == -1  # dynamic batch: Triton's max_batch_size takes it over
        out[value.name] = (ONNX_TO_TRITON[t.elem_type], dims[1:])
    return out


def config_io(config):
    return {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in (*config.input, *config.output)}


def with_trt_targets(src, dest, targets: dict):
    """Copy an artifact and add TensorRT targets as the GPU builds record them (fixture plans)."""
    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for name, (cc, plan_bytes) in targets.items():
        engine = None
        if plan_bytes is not None:
            engine = f"engines/{name}.plan"
            (dest / "engines").mkdir(exist_ok=True)
            (dest / engine).write_bytes(plan_bytes)
        manifest["targets"][name] = {"build": {"backend": "tensorrt", "compute_capability": cc, "gfx_arch": None,
                                               "engine_file": engine, "planned_engine_file": f"engines/{name}.plan"},
                                     "parity": manifest["targets"]["cpu-onnxruntime"]["parity"]}
    write_manifest(dest, {k: v for k, v in manifest.items() if k != "files"})
    return dest


def test_cpu_config_parses_and_matches_the_graph(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["version"] == f"1-build{BUILD}" and manifest["build"]["triton_version"] == BUILD
    model_dir = artifact / "triton" / CPU_MODEL
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), pb.ModelConfig())
    assert config.name == CPU_MODEL and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8 and config.dynamic_batching.max_queue_delay_microseconds == 100
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    io = graph_io(artifact / "model.onnx")
    assert config_io(config) == io and io["logits"] == ("TYPE_FP32", [-1, 320])
    assert (model_dir / str(BUILD) / "model.onnx").read_bytes() == (artifact / "model.onnx").read_bytes()
    assert manifest["files"][f"triton/{CPU_MODEL}/config.pbtxt"]


def test_tensorrt_plans_per_compute_capability_from_two_artifacts(artifact, tmp_path):
    a100 = with_trt_targets(artifact, tmp_path / "a100", {"a100-tensorrt": ("8.0", b"plan-sm80")})
    h100 = with_trt_targets(artifact, tmp_path / "h100", {"h100-tensorrt": ("9.0", b"plan-sm90"),
                                                          "h100-dry-run": ("9.0", None)})
    repo = tmp_path / "repo"
    code, stdout, stderr = run_cli("triton", a100, h100, "--repo", repo, "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert set(result["models"]) == {CPU_MODEL, TRT_MODEL}
    no_cache = "no KV cache in the graph (export.kv_cache: false)"  # so no generate model
    assert result["skipped"] == {f"{h100}:h100-dry-run": "no engine built (dry run)", f"{a100}:generate": no_cache,
                                 f"{h100}:generate": no_cache}
    config = text_format.Parse((repo / TRT_MODEL / "config.pbtxt").read_text(), pb.ModelConfig())
    assert config.platform == "tensorrt_plan"
    assert dict(config.cc_model_filenames) == {"8.0": "model_sm80.plan", "9.0": "model_sm90.plan"}
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert config_io(config) == graph_io(artifact / "model.onnx")
    assert (repo / TRT_MODEL / str(BUILD) / "model_sm80.plan").read_bytes() == b"plan-sm80"
    assert (repo / TRT_MODEL / str(BUILD) / "model_sm90.plan").read_bytes() == b"plan-sm90"
    # updating the repository adds a version and leaves the old one
    assert run_cli("triton", a100, "--repo", repo, "--version", BUILD + 1)[0] == 0
    assert sorted(p.name for p in (repo / CPU_MODEL).iterdir()) == [str(BUILD), str(BUILD + 1), "config.pbtxt"]


def test_a_plan_for_the_same_compute_capability_twice_is_refused(artifact, tmp_path):
    one = with_trt_targets(artifact, tmp_path / "one", {"a100-tensorrt": ("8.0", b"x")})
    two = with_trt_targets(artifact, tmp_path / "two", {"a100-tensorrt": ("8.0", b"y")})
    code, _, stderr = run_cli("triton", one, two, "--repo", tmp_path / "repo")
    assert code == 1 and "compute capability ['8.0']" in stderr


def test_a_repo_path_under_a_file_is_refused_before_any_work(artifact, tmp_path):
    (tmp_path / "taken").write_text("")
    code, stdout, stderr = run_cli("triton", artifact, "--repo", tmp_path / "taken" / "repo")
    assert code == 1 and stdout == "" and f"{tmp_path / 'taken'} is a file, not a folder" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_fixed_batch_axis_gives_max_batch_size_0_and_full_dims():
    from converter.artifact.triton import ModelSpec, TensorSpec, check_config, model_config
    from converter.recipe import Triton

    spec = ModelSpec("m", "onnxruntime", 1, [TensorSpec("input_ids", "TYPE_INT64", (1, -1))],
                     [TensorSpec("logits", "TYPE_FP32", (1, -1, 320))], {})
    config = parse_config(text_format.MessageToString(model_config(spec, Triton())), "m")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert config_io(config) == {"input_ids": ("TYPE_INT64", [1, -1]), "logits": ("TYPE_FP32", [1, -1, 320])}
    assert check_config(config, spec) == []
    config.max_batch_size = 4
    assert "max_batch_size is 4 but the graph's batch axis is fixed" in check_config(config, spec)


def test_the_recipes_thread_count_reaches_only_onnx_runtime_models():
    from converter.artifact.triton import ModelSpec, TensorSpec, check_config, validated_config_text
    from converter.recipe import Triton

    io = [TensorSpec("input_ids", "TYPE_INT64", (-1, -1))], [TensorSpec("logits", "TYPE_FP32", (-1, -1, 320))]
    settings = Triton(intra_op_thread_count=2, instance_count=2)
    cpu = ModelSpec("m-cpu", "onnxruntime", 1, *io, {}, settings=settings)
    config = parse_config(validated_config_text(cpu, settings), "m-cpu")
    assert {k: v.string_value for k, v in config.parameters.items()} == {"intra_op_thread_count": "2"}
    del config.parameters["intra_op_thread_count"]  # a hand-edited repository loses it
    assert check_config(config, cpu) == ["parameters {}, expected {'intra_op_thread_count': '2'}"]
    # ONNX Runtime's default (0) writes no parameter; a TensorRT plan takes none
    default = ModelSpec("m-cpu", "onnxruntime", 1, *io, {}, settings=Triton())
    assert not parse_config(validated_config_text(default, Triton()), "m-cpu").parameters
    gpu = ModelSpec("m-tensorrt", "tensorrt", 1, *io, {}, settings=settings)
    assert not parse_config(validated_config_text(gpu, settings), "m-tensorrt").parameters


def test_a_wrong_field_is_caught(artifact):
    text = (artifact / "triton" / CPU_MODEL / "config.pbtxt").read_text()
    assert parse_config(text, "ok").max_batch_size == 8
    with pytest.raises(TritonConfigError, match="max_batch_sise"):
        parse_config(text.replace("max_batch_size", "max_batch_sise"), CPU_MODEL)
    with pytest.raises(TritonConfigError, match="KIND_TPU"):
        parse_config(text.replace("KIND_CPU", "KIND_TPU"), CPU_MODEL)


@pytest.mark.parametrize("edit, expected", [
    (("max_batch_size", "max_batch_sise"), "not a valid Triton ModelConfig"),
    (("TYPE_INT64", "TYPE_INT32"), "input input_ids is TYPE_INT32 [-1], graph has TYPE_INT64 [-1]"),
])
def test_verify_rejects_a_config_that_does_not_fit(artifact, tmp_path, edit, expected):
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    config = copy / "triton" / CPU_MODEL / "config.pbtxt"
    config.write_text(config.read_text().replace(*edit, 1))
    manifest = json.loads((copy / "manifest.json").read_text())
    write_manifest(copy, {k: v for k, v in manifest.items() if k != "files"})  # hashes agree: only the config is wrong
    code, _, stderr = run_cli("verify", copy)
    assert code == 1 and expected in stderr


def test_verify_and_triton_refuse_a_flipped_byte_in_the_triton_model(artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    assert run_cli("verify", copy)[0] == 0
    model = copy / "triton" / CPU_MODEL / str(BUILD) / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 3] ^= 0x01
    model.write_bytes(bytes(data))
    code, _, stderr = run_cli("verify", copy)
    assert code == 1 and f"changed: triton/{CPU_MODEL}/{BUILD}/model.onnx" in stderr
    code, _, stderr = run_cli("triton", copy, "--repo", tmp_path / "repo")
    assert code == 1 and "do not match the manifest" in stderr and not (tmp_path / "repo").exists()
