from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import pytest
import yaml

if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n auto`: the workers share the cores, one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads (here and in convert.py subprocesses)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models

from tiny_models import DECODERS, ENCODERS  # noqa: E402


def quantized_matmuls(path: Path) -> list[str]:
    """Names of an exported graph's quantized MatMuls, from their int8 weight initializers
    (a MatMul of several linears is named after all of them: converter/export/qdq_names.py)."""
    import onnx

    from converter.export.qdq_names import WEIGHT_SUFFIX

    graph = onnx.load(str(path), load_external_data=False).graph
    return [i.name.removesuffix(WEIGHT_SUFFIX) for i in graph.initializer if i.name.endswith(WEIGHT_SUFFIX)]


def qdq_matmul_model(w_int8, w_scale, x_scale, *, x_zero_point: int = 0, weight_axis: int = 1, bias=None,
                     x_shape=None, opset: int = 18):
    """x -> Q/DQ -> MatMul with DQ(int8 W (K, N)) [+ bias] -> y: the exporter's QDQ form of one linear,
    nodes named `fc/...`. `x_shape` defaults to (batch, sequence, K), both dynamic."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x_scale = np.asarray(x_scale, np.float32)
    inits = [numpy_helper.from_array(w_int8, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), "w_zp"),
             numpy_helper.from_array(x_scale, "x_scale"),
             numpy_helper.from_array(np.full(x_scale.shape, x_zero_point, np.int8), "x_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="fc/input_quantize"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="fc/input_dequantize"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wdq"], name="fc/weight_dequantize",
                              axis=weight_axis),
             helper.make_node("MatMul", ["xdq", "wdq"], ["y" if bias is None else "y_matmul"], name="fc/matmul")]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        nodes.append(helper.make_node("Add", ["y_matmul", "bias"], ["y"], name="fc/bias"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape or [None, None, w_int8.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


# Test files that read the session `exported` fixture (an export of every table family, minutes).
EXPORTED_FILES = {"tests/export/test_exporter.py", "tests/targets/test_qdq_lint.py", "tests/targets/test_tensorrt.py"}


def _scope(nodeid: str) -> str:
    file = nodeid.split("::", 1)[0]
    return "exported" if file in EXPORTED_FILES else file


@pytest.hookimpl(optionalhook=True)  # `-p no:xdist` unregisters the hook spec: without this, INTERNALERROR
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (`-n auto`), each test file runs whole in one worker, so its module fixtures
    are built once, and the `exported` files share one worker, or each worker would build all of it.
    Files are handed out in collection order (see pytest_collection_modifyitems)."""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    config.option.loadscopereorder = False
    return FileScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Real-model files first (each holds a conversion of minutes: started last, one would run alone at
    the end), then the other files, most tests first. EXPORTED_FILES must name every file that reads
    `exported` (the scheduler sees only node ids)."""
    files = {_scope(item.nodeid) for item in items if "exported" in item.fixturenames}
    if files - {"exported"}:
        raise pytest.UsageError(f"add {sorted(files - {'exported'})} to EXPORTED_FILES in tests/conftest.py")
    sizes = collections.Counter(_scope(item.nodeid) for item in items)
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, -sizes[_scope(item.nodeid)]))


CALIBRATION_TEXT = ROOT / "recipes" / "data" / "gpl-3.0.txt"
EVALUATION_TEXT = ROOT / "recipes" / "data" / "apache-2.0.txt"


@pytest.fixture(scope="session", autouse=True)
def stage_cache_dir(tmp_path_factory):
    """One stage cache for the session (never the user's): content-addressed, so tests share it safely."""
    import os

    from converter.stage_cache import ENV_DIR

    path = tmp_path_factory.mktemp("stage-cache")
    previous = os.environ.get(ENV_DIR)
    os.environ[ENV_DIR] = str(path)
    yield path
    if previous is None:
        os.environ.pop(ENV_DIR, None)
    else:
        os.environ[ENV_DIR] = previous


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """arch -> HF folder of a tiny model with planted outliers and a tokenizer (built once)."""
    from tiny_models import TINY_CONFIGS, save_tiny_checkpoint

    base = tmp_path_factory.mktemp("checkpoints")
    text = CALIBRATION_TEXT.read_text()
    return {arch: save_tiny_checkpoint(arch, base / arch, text) for arch in TINY_CONFIGS}


def convert_shipped(recipe: str, out: Path, *overrides: str) -> tuple[dict, dict]:
    """Run `convert.py <recipe> [--set KEY=VALUE ...]` as a user would; returns (JSON result, the artifact's manifest)."""
    import json
    import subprocess

    proc = subprocess.run(
        [sys.executable, "convert.py", recipe, *(a for o in overrides for a in ("--set", o)),
         "--output-dir", str(out), "--json", "--quiet"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    return result, json.loads((out / result["name"] / result["version"] / "manifest.json").read_text())


def tiny_recipe_dict(checkpoint: Path, version: str = "1") -> dict:
    return {
        "schema_version": 1,
        "source": {"path": str(checkpoint)},
        "calibration": {"files": [str(CALIBRATION_TEXT)], "seq_len": 64, "num_samples": 8, "batch_size": 4},
        "smoothing": {"alpha": 0.5},
        "parity": {"eval": {"files": [str(EVALUATION_TEXT)], "seq_len": 64, "num_samples": 4, "batch_size": 2}},
        "output": {"name": "tiny-w8a8", "version": version},
    }


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(dict) -> path of a YAML recipe in a fresh temp folder."""

    def write(data: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


TINY_ARCHS = [*DECODERS, *ENCODERS]  # every table family (llama-tied only where ties matter)


@pytest.fixture(scope="session", params=TINY_ARCHS)
def exported(request, tmp_path_factory):
    """(arch, smoothed model, plan, fp32 path, int8 QDQ path, folder) of one tiny architecture."""
    import torch
    from tiny_models import build_tiny

    from converter.export.exporter import export_fp32, insert_qdq
    from converter.models.archs import arch_spec, block_linear_names
    from converter.models.text import Windows
    from converter.quant.calibrate import collect_input_amax
    from converter.quant.quantize import plan_quantization
    from converter.quant.smooth import smooth
    from converter.recipe import Export, Quantization, Smoothing

    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    model = build_tiny(arch)
    spec = arch_spec(model)
    names = block_linear_names(model, spec)
    quantized = [n for n in names if n != spec.lm_head]  # Quantization() keeps lm_head float
    windows = Windows(torch.randint(0, 300, (8, 48), generator=torch.Generator().manual_seed(1)), "t", 8)
    stats = collect_input_amax(model, quantized, windows, 4)
    smooth(model, stats.amax, Smoothing(alpha=0.5), spec)
    stats = collect_input_amax(model, quantized, windows, 4)
    plan = plan_quantization(model, quantized, stats.absmax_ranges(), Quantization())
    fp32 = export_fp32(model, tmp / "fp32.onnx", Export())
    int8 = insert_qdq(fp32, tmp / "model.onnx", model, plan, Export())
    return arch, model, plan, fp32, int8.path, tmp
