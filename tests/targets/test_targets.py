"""Target registry and CLI: `convert.py targets` is truthful, GPU targets fail in one line without
their hardware, and `--dry-run` records the exact build plan in the manifest."""

import importlib.util
import json

import pytest
import yaml

from conftest import tiny_recipe_dict
from converter.targets.registry import TARGETS
from converter.targets.runners import int8_products_exact, x86_int8_flags
from runcli import run_cli, run_subprocess

GPU_TARGETS = ["a100-tensorrt", "h100-tensorrt", "mi250x-migraphx", "mi300-migraphx"]
no_tensorrt = pytest.mark.skipif(TARGETS["h100-tensorrt"].availability()[0], reason="this machine can build TensorRT engines")


def test_registry_holds_every_target_with_its_hardware():
    assert set(GPU_TARGETS) | {"cpu-onnxruntime"} <= set(TARGETS)
    assert "9.0" in TARGETS["h100-tensorrt"].hardware and "8.0" in TARGETS["a100-tensorrt"].hardware
    assert "gfx90a" in TARGETS["mi250x-migraphx"].hardware and "gfx942" in TARGETS["mi300-migraphx"].hardware


def test_every_target_carries_the_data_other_modules_read():
    """CI labels, how Triton serves it (or why not), and which graph forms it takes: from the target."""
    for name, target in TARGETS.items():
        assert target.name == name and target.ci_labels, name
        assert bool(target.triton_platform) != bool(target.triton_refusal), name
    assert TARGETS["cpu-onnxruntime"].ort_graph and not TARGETS["h100-tensorrt"].ort_graph
    assert TARGETS["h100-tensorrt"].strict_qdq and TARGETS["mi300-migraphx"].fixed_shape
    assert TARGETS["h100-tensorrt"].ci_labels[-1] == "gpu-h100"


def test_a_new_target_is_one_registry_entry(monkeypatch, write_recipe, tmp_path):
    """A target registered with its data alone is accepted and refused by the recipe and labelled by the
    CI matrix: neither tests a backend name."""
    from dataclasses import replace

    from converter.artifact import ci_matrix
    from converter.recipe import load_recipe

    npu = replace(TARGETS["cpu-onnxruntime"], name="x-npu", backend="npu", ort_graph=False,
                  ci_labels=("self-hosted", "npu"), triton_platform=None, triton_refusal="no NPU platform")
    monkeypatch.setitem(TARGETS, "x-npu", npu)
    data = {**tiny_recipe_dict(tmp_path), "targets": ["x-npu"]}
    assert load_recipe(write_recipe(data)).recipe.targets == ["x-npu"]
    assert ci_matrix.ci_labels("x-npu") == ["self-hosted", "npu"]
    dynamic = {**data, "quantization": {"activations": {"mode": "dynamic"}}}
    with pytest.raises(Exception, match="x-npu need static per-tensor scales"):
        load_recipe(write_recipe(dynamic, "dynamic.yaml"))
    fused = {**data, "export": {"kv_cache": True, "attention": "onnxruntime"}}
    with pytest.raises(Exception, match="x-npu cannot run"):
        load_recipe(write_recipe(fused, "fused.yaml"))


def test_targets_command_says_what_runs_here_and_why_not():
    code, stdout, _ = run_cli("targets", "--json")
    assert code == 0
    rows = {r["target"]: r for r in json.loads(stdout)}
    assert rows["cpu-onnxruntime"]["builds_and_runs_here"] and rows["cpu-onnxruntime"]["why_not"] is None
    for name in GPU_TARGETS:
        ok, why = TARGETS[name].availability()
        assert rows[name]["builds_and_runs_here"] == ok
        module = "tensorrt" if "tensorrt" in name else "migraphx"
        if importlib.util.find_spec(module) is None:  # the reason names the missing module
            assert not ok and module in rows[name]["why_not"]
    rtx = rows["(check) tensorrt-acceptance"]
    assert rtx["builds_and_runs_here"] == (importlib.util.find_spec("tensorrt_rtx_bindings") is not None)
    flags = x86_int8_flags()
    int8 = rows["cpu-onnxruntime"]["int8_here"]
    assert (int8.startswith(", ".join(flags)) if flags else "exact" in int8) and "int8_here" not in rows["h100-tensorrt"]


@pytest.mark.parametrize(("flags", "found"), [("fpu sse4_1 avx2 avx512f", []), ("avx2 avx512_vnni avx512f", ["avx512_vnni"]),
                                              ("amx_int8 avx_vnni avx512_vnni", ["amx_int8", "avx512_vnni", "avx_vnni"])])
def test_int8_flags_are_read_from_cpuinfo(tmp_path, monkeypatch, flags, found):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n")
    assert x86_int8_flags(str(cpuinfo)) == found
    assert int8_products_exact.__wrapped__(str(cpuinfo)) == bool(found)  # no VNNI/AMX: saturating pairs
    assert x86_int8_flags(str(tmp_path / "missing")) is None and not int8_products_exact.__wrapped__(str(tmp_path / "missing"))


@no_tensorrt
def test_h100_without_dry_run_exits_1_with_one_line(tiny_checkpoints, tmp_path):
    data = tiny_recipe_dict(tiny_checkpoints["llama"])
    data["targets"] = ["h100-tensorrt"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    proc = run_subprocess(recipe, "--output-dir", tmp_path / "out", "--quiet")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: target h100-tensorrt"), proc.stderr
    assert "tensorrt" in lines[0].split("cannot build")[1] and "--dry-run" in lines[0]
    assert not (tmp_path / "out" / "tiny-w8a8" / "1").exists()


def test_dry_run_records_gpu_build_plans(tiny_checkpoints, tmp_path):
    data = tiny_recipe_dict(tiny_checkpoints["qwen2"])
    data["targets"] = ["cpu-onnxruntime", "h100-tensorrt", "mi250x-migraphx"]
    data["engine"] = {"batch": {"min": 1, "opt": 2, "max": 4}, "sequence": {"min": 8, "opt": 64, "max": 1024},
                      "hardware_compatibility": "ampere_plus", "tensorrt_version": "10.13.3"}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    code, stdout, stderr = run_cli(recipe, "--output-dir", tmp_path / "out", "--quiet", "--dry-run", "--json")
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "out" / "tiny-w8a8" / "1" / "manifest.json").read_text())
    trt = manifest["targets"]["h100-tensorrt"]["build"]
    assert trt["backend"] == "tensorrt" and trt["compute_capability"] == "9.0" and trt["gfx_arch"] is None
    assert trt["engine_file"] is None and trt["planned_engine_file"] == "model.h100-tensorrt.sm90.trt10.13.3.plan"
    assert trt["profiles"][0]["input_ids"] == {"min": [1, 8], "opt": [2, 64], "max": [4, 1024]}
    assert trt["hardware_compatibility"] == "ampere_plus" and trt["network_definition"] == "strongly_typed"
    mgx = manifest["targets"]["mi250x-migraphx"]["build"]
    assert mgx["backend"] == "migraphx" and mgx["gfx_arch"] == "gfx90a" and mgx["compute_capability"] is None
    assert mgx["engine_file"] is None and mgx["planned_engine_file"] == "model.mi250x-migraphx.gfx90a.b2s64.mxr"
    assert manifest["targets"]["h100-tensorrt"]["parity"]["passed"] is None
    assert manifest["targets"]["cpu-onnxruntime"]["parity"]["passed"] and manifest["parity_passed"]
    assert "model.h100-tensorrt.sm90.trt10.13.3.plan" in stderr  # the plan is printed too
    assert json.loads(stdout)["targets"]["h100-tensorrt"]["build"]["planned_engine_file"] == trt["planned_engine_file"]
    checks = manifest["checks"]
    # 2 blocks: q/k/v as one MatMul, gate/up as one, o_proj, down_proj (lm_head float)
    assert checks["qdq_lint"]["passed"] and checks["qdq_lint"]["quantize_nodes"] == 2 * 4
    if importlib.util.find_spec("tensorrt_rtx_bindings") is not None:
        assert checks["tensorrt_rtx"]["passed"] and checks["tensorrt_rtx"]["network"]["int8_matmul_layers"] == 2 * 4
    assert "parity not run" in (tmp_path / "out" / "tiny-w8a8" / "1" / "parity_report.md").read_text()
