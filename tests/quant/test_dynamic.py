"""Dynamic activation levels O1 (per token) and O2 (per tensor): arithmetic, export, recipe rules."""

import collections
import copy
import json

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper

from conftest import tiny_recipe_dict
from converter.errors import UserError
from converter.export.exporter import export_fp32, insert_qdq
from converter.models.archs import arch_spec, block_linear_names
from converter.models.text import Windows
from converter.quant.calibrate import collect_input_amax
from converter.quant.quantize import (
    apply_fake_quant,
    fake_quantize_dynamic_per_tensor,
    fake_quantize_per_token,
    plan_quantization,
)
from converter.recipe import ActivationQuant, Export, Quantization, load_recipe
from converter.targets.onnxruntime import build_onnxruntime
from converter.targets.runners import onnxruntime_session
from runcli import run_cli, run_subprocess
from tiny_models import build_tiny

LEVELS = {"O1": {"mode": "dynamic", "granularity": "per_token"}, "O2": {"mode": "dynamic", "granularity": "per_tensor"}}


def test_per_tensor_dynamic_matches_onnx_dynamic_quantize_linear():
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(0)) * 3 + 0.7  # off-centre: zero point != 128
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "zp"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(n, t, None if n != "q" else list(x.shape))
         for n, t in (("q", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("zp", TensorProto.UINT8))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, s, zp = session.run(None, {"x": x.numpy()})
    expected = (q.astype(np.float32) - float(zp)) * s
    np.testing.assert_allclose(fake_quantize_dynamic_per_tensor(x).numpy(), expected, rtol=0, atol=1e-6)
    assert int(zp) != 128  # the asymmetric range really is used


def test_per_token_scale_ignores_other_tokens():
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    spiked = x.clone()
    spiked[0, 3, 7] = 500.0  # one token with an extreme outlier
    a, b = fake_quantize_per_token(x), fake_quantize_per_token(spiked)
    untouched = torch.ones(2, 5, dtype=torch.bool)
    untouched[0, 3] = False
    assert torch.equal(a[untouched], b[untouched])
    assert float((a - x).abs().max()) <= float(x.abs().amax(-1).max()) / 127 / 2 + 1e-6
    # per tensor, the spike would have flattened every other token
    assert float((fake_quantize_dynamic_per_tensor(spiked) - spiked)[untouched].abs().max()) > 0.5


@pytest.fixture(scope="module", params=sorted(LEVELS))
def dynamic_export(request, tmp_path_factory):
    level = request.param
    tmp = tmp_path_factory.mktemp(level)
    model = build_tiny("llama")
    names = block_linear_names(model, arch_spec(model))
    windows = Windows(torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1)), "t", 4)
    ranges = collect_input_amax(model, names, windows, 4).absmax_ranges()
    cfg = Quantization(exclude=[], activations=ActivationQuant(**LEVELS[level]))  # lm_head too: it ends in `logits`
    plan = plan_quantization(model, names, ranges, cfg)
    fp32 = export_fp32(model, tmp / "fp32.onnx", Export())
    int8 = insert_qdq(fp32, tmp / "model.onnx", model, plan, Export())
    static = plan_quantization(model, names, ranges, Quantization(exclude=[]))
    return level, model, plan, static, int8.path, tmp


def test_dynamic_export_equals_fake_quant_and_runs_int8_kernels(dynamic_export):
    level, model, plan, static, path, tmp = dynamic_export
    ids = torch.randint(0, 300, (2, 23), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    out = onnxruntime_session(path).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        ref = apply_fake_quant(copy.deepcopy(model), plan)(input_ids=ids, attention_mask=mask).logits.numpy()
        as_static = apply_fake_quant(copy.deepcopy(model), static)(input_ids=ids, attention_mask=mask).logits.numpy()
    assert np.abs(out - ref).max() < 1e-4
    assert np.abs(out - as_static).max() > 1e-3  # not the static arithmetic under another name
    onnx.checker.check_model(str(path), full_check=True)
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["QuantizeLinear"] == 0 and ops["MatMulInteger"] == 15
    assert ops["DynamicQuantizeLinear"] == (15 if level == "O2" else 0)
    report = build_onnxruntime("cpu-onnxruntime", path, tmp, plan)
    assert report.fused_linears == 15 and report.unfused_linears == []
    # O2: ORT merges the DynamicQuantizeLinear shared by q/k/v (and gate/up) and runs those MatMuls as
    # MatMulIntegerToFloat on the one quantized input; the rest fuse whole into DynamicQuantizeMatMul
    kernels = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"} if level == "O2" else {"MatMulInteger"}
    assert set(report.int8_kernels) <= kernels and sum(report.int8_kernels.values()) == 15


def test_per_token_needs_dynamic_mode():
    with pytest.raises(ValueError, match="per_token granularity needs mode: dynamic"):
        ActivationQuant(granularity="per_token", mode="static")
    assert ActivationQuant().level == "O3" and ActivationQuant(**LEVELS["O1"]).level == "O1"


def test_dynamic_levels_are_refused_for_tensorrt_targets(tiny_checkpoints, tmp_path):
    data = tiny_recipe_dict(tiny_checkpoints["llama"])
    data["quantization"] = {"activations": LEVELS["O2"]}
    data["targets"] = ["cpu-onnxruntime", "a100-tensorrt"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=r"dynamic activation quantization \(O2\).*a100-tensorrt need static"):
        load_recipe(path)
    proc = run_subprocess(path, "--output-dir", tmp_path / "out", "--quiet")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "O3" in proc.stderr and not (tmp_path / "out").exists()


def test_o1_conversion_end_to_end(tiny_checkpoints, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_checkpoints["qwen2"])))
    code, stdout, stderr = run_cli(path, "--output-dir", tmp_path / "out", "--json", "--quiet",
                                   "--set", "quantization.activations={mode: dynamic, granularity: per_token}",
                                   "--set", "smoothing.search=per_group", "--set", "smoothing.alpha_grid=[0.3,0.7]")
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "out" / "tiny-w8a8" / "1" / "manifest.json").read_text())
    assert manifest["model"]["activation_quantization"] == "O1"
    assert manifest["model"]["format"] == "onnx-dynamic-w8a8-per-token"
    assert "O1" in manifest["checks"]["skipped"]
    build = manifest["targets"]["cpu-onnxruntime"]["build"]
    assert build["int8_kernels"] == {"MatMulInteger": 14} and build["unfused_linears"] == []
    assert {q["act_mode"] for q in manifest["quantization"].values()} == {"dynamic_per_token"}
    assert manifest["targets"]["cpu-onnxruntime"]["parity"]["passed"]
