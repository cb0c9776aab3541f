"""`quantization.embedding: int8`: the token embedding table stored int8 per row, read by
Gather(int8) -> Cast -> Mul(Gather(row scales)) for ONNX Runtime and by DequantizeLinear -> Gather for
TensorRT; the fake-quant model computes the same values."""

import copy
import importlib.util

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from converter.export.exporter import export_fp32, insert_qdq
from converter.export.qdq_names import EMBEDDING_SCALE_SUFFIX, EMBEDDING_SUFFIX
from converter.models.archs import arch_spec, block_linear_names
from converter.models.io import model_io
from converter.models.text import Windows
from converter.quant.calibrate import collect_input_amax
from converter.quant.quantize import apply_fake_quant, plan_quantization
from converter.quant.smooth import smooth
from converter.recipe import Export, Quantization, Smoothing
from converter.stage_cache import _plan_from_entry, _plan_to_entry
from converter.targets.engine_options import EngineOptions
from converter.targets.qdq_lint import lint_qdq
from converter.targets.runners import onnxruntime_session
from converter.targets.tensorrt_rtx import RTX_MODULE, accept
from tiny_models import build_tiny

# (arch, what the recipe keeps float): an untied LM head, a tied one left float (so the float table
# must stay for it), and an encoder (BERT's word embeddings; position/type embeddings stay float).
CASES = {"llama": [], "llama-tied": ["lm_head"], "bert": []}


def _convert(arch: str, exclude: list[str], embedding: str, folder, layout: str = "gather_rows"):
    model = build_tiny(arch)
    spec = arch_spec(model)
    names = block_linear_names(model, spec)
    windows = Windows(torch.randint(0, 300, (8, 48), generator=torch.Generator().manual_seed(1)), "t", 8)
    smooth(model, collect_input_amax(model, names, windows, 4).amax,
           Smoothing(alpha=0.5, groups=["attn_in", "mlp_in", "mlp_down", "attn_out"]), spec)
    quantized = [n for n in names if n not in exclude]
    ranges = collect_input_amax(model, quantized, windows, 4).absmax_ranges()
    plan = plan_quantization(model, names, ranges, Quantization(exclude=exclude, embedding=embedding))
    fp32 = export_fp32(model, folder / "fp32.onnx", Export())
    return model, plan, insert_qdq(fp32, folder / f"model-{embedding}-{layout}.onnx", model, plan, Export(), layout)


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    arch = request.param
    folder = tmp_path_factory.mktemp(f"emb-{arch}")
    model, plan, int8 = _convert(arch, CASES[arch], "int8", folder)
    _, _, float_table = _convert(arch, CASES[arch], "float", folder)
    _, _, for_gpu = _convert(arch, CASES[arch], "int8", folder, "dequantize_table")
    return arch, model, plan, int8, float_table, for_gpu


def test_plan_has_per_row_scales_of_the_table(converted):
    _, model, plan, *_ = converted
    table = model.get_input_embeddings().weight.detach()
    amax = table.abs().amax(dim=1)  # recomputed here: one symmetric scale per vocabulary row
    expected = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero row (BERT's padding) gets 1
    assert torch.equal(plan.embedding.weight_scale, expected)
    deq = torch.round(table / expected[:, None]).clamp(-127, 127) * expected[:, None]
    assert plan.embedding.weight_rel_error == pytest.approx(float((table - deq).norm() / table.norm()), rel=1e-6)
    assert 0 < plan.embedding.weight_rel_error < 0.01


def test_gathers_read_the_int8_table_and_the_float_one_goes_unless_a_float_head_reads_it(converted):
    arch, model, plan, int8, *_ = converted
    graph = onnx.load(str(int8.path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    table = model.get_input_embeddings().weight.detach().numpy()
    q_name, s_name = f"{plan.embedding.name}{EMBEDDING_SUFFIX}", f"{plan.embedding.name}{EMBEDDING_SCALE_SUFFIX}"
    assert inits[q_name].dtype == np.int8 and inits[q_name].shape == table.shape
    assert inits[s_name].shape == (table.shape[0], 1)
    np.testing.assert_array_equal(inits[q_name], np.clip(np.round(table / inits[s_name]), -127, 127))
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == q_name]
    assert len(gathers) == 1
    float_tables = [k for k, v in inits.items() if v.dtype == np.float32 and v.shape in (table.shape, table.T.shape)]
    if arch == "llama-tied":  # the float lm_head tied to the table keeps its own float copy (transposed)
        assert len(float_tables) == 1 and np.array_equal(inits[float_tables[0]], table.T)
        assert not any(n.op_type == "Gather" and n.input[0] == float_tables[0] for n in graph.node)
    else:
        assert float_tables == []


def test_the_table_costs_a_quarter_of_its_float_bytes(converted):
    arch, model, _, int8, float_table, _ = converted
    table = model.get_input_embeddings().weight
    saved = float_table.size_bytes - int8.size_bytes
    if arch == "llama-tied":  # nothing saved: the float head keeps the float table in the file
        assert saved < 0
    else:  # 4 bytes -> 1 byte per value, plus one float scale per row
        expected = table.numel() * 3 - table.shape[0] * 4
        assert expected - 2000 < saved <= expected  # less the new nodes' and names' bytes


def test_onnxruntime_equals_the_fake_quant_model(converted):
    _, model, plan, int8, float_table, for_gpu = converted
    spec = arch_spec(model)
    io = model_io(spec, model.config)
    ids = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(5))
    feed = io.feed(ids, torch.ones_like(ids))
    out = onnxruntime_session(int8.path).run([spec.output], feed)[0]
    float_out = onnxruntime_session(float_table.path).run([spec.output], feed)[0]
    fq = apply_fake_quant(copy.deepcopy(model), plan)
    with torch.no_grad():
        ref = getattr(fq(**{k: torch.from_numpy(v) for k, v in feed.items()}), spec.output).numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale, rtol=0)
    # the TensorRT layout computes the same table (ONNX Runtime runs it too, only slower)
    np.testing.assert_array_equal(onnxruntime_session(for_gpu.path).run([spec.output], feed)[0], out)
    # and the table's rounding reaches the output: the float-table artifact differs
    assert np.abs(out - float_out).max() > 1e-4 * scale


def test_fake_quant_keeps_a_tied_float_head_on_the_float_table(converted):
    arch, model, plan, *_ = converted
    if arch != "llama-tied":
        pytest.skip("only a tied head left float shares the table")
    fq = apply_fake_quant(copy.deepcopy(model), plan)
    assert torch.equal(fq.lm_head.weight, model.lm_head.weight)  # the head still reads float values
    assert not torch.equal(fq.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_stage_cache_round_trips_the_embedding_plan(converted):
    _, _, plan, *_ = converted
    meta, tensors = _plan_to_entry(plan)
    back = _plan_from_entry(meta, tensors)
    assert back.embedding.name == plan.embedding.name
    assert torch.equal(back.embedding.weight_scale, plan.embedding.weight_scale)
    assert back.embedding.weight_rel_error == plan.embedding.weight_rel_error


def test_float_embedding_is_the_default_and_leaves_the_graph_alone(tmp_path):
    assert Quantization().embedding == "float"
    _, plan, int8 = _convert("llama", [], "float", tmp_path)
    assert plan.embedding is None
    names = {i.name for i in onnx.load(str(int8.path)).graph.initializer}
    assert not any(n.endswith((EMBEDDING_SUFFIX, EMBEDDING_SCALE_SUFFIX)) for n in names)


def test_recipe_refuses_an_unknown_embedding_dtype():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="embedding"):
        Quantization(embedding="int4")


@pytest.mark.skipif(importlib.util.find_spec(RTX_MODULE) is None, reason="TensorRT-RTX packages not installed")
def test_tensorrt_parser_and_builder_accept_the_dequantized_table(converted):
    _, _, plan, _, _, for_gpu = converted
    options = EngineOptions(batch={"min": 1, "opt": 2, "max": 4}, sequence={"min": 1, "opt": 64, "max": 512},
                            workspace_mb=256, builder_optimization_level=2)
    assert lint_qdq(for_gpu.path).issues == []  # TensorRT's explicit-quantization rules hold for the table's DQ
    result = accept(for_gpu.path, options)
    assert result["passed"] and result["parsed"] and result["built"], result.get("error")
    assert sorted(result["network"]["int8_matmul_linears"]) == sorted(plan.linears)


def test_tensorrt_refuses_the_onnxruntime_layout(converted, tmp_path):
    """Why GPU targets get the other layout: TensorRT takes an int8 constant only as a DQ input."""
    _, _, _, int8, _, _ = converted
    if importlib.util.find_spec(RTX_MODULE) is None:
        pytest.skip("TensorRT-RTX packages not installed")
    options = EngineOptions(batch={"min": 1, "opt": 1, "max": 1}, sequence={"min": 1, "opt": 8, "max": 8},
                            workspace_mb=256, builder_optimization_level=0)
    assert accept(int8.path, options)["passed"] is False


def test_recipe_picks_the_layout_by_target_and_refuses_a_mix():
    from converter.recipe import Recipe

    base = {"schema_version": 1, "source": {"path": "m"}, "calibration": {"files": ["c.txt"]},
            "parity": {"eval": {"files": ["e.txt"]}}, "output": {"name": "n", "version": "1"},
            "quantization": {"embedding": "int8"}}
    assert Recipe(**base).embedding_layout == "gather_rows"
    assert Recipe(**{**base, "targets": ["h100-tensorrt"]}).embedding_layout == "dequantize_table"
    assert Recipe(**{**base, "quantization": {}}).embedding_layout is None
    with pytest.raises(ValueError, match="separate recipes"):
        Recipe(**{**base, "targets": ["cpu-onnxruntime", "a100-tensorrt"]})


def test_cli_converts_with_an_int8_table(tiny_checkpoints, tmp_path):
    """Through the whole pipeline: KV-cache graph, parity and generation parity, manifest, checks."""
    import json
    import os

    import yaml

    from conftest import tiny_recipe_dict
    from runcli import run_cli

    sizes = {}
    for embedding in ("float", "int8"):
        data = tiny_recipe_dict(tiny_checkpoints["llama"])
        data["export"] = {"kv_cache": True}
        data["quantization"] = {"exclude": [], "embedding": embedding}
        recipe = tmp_path / f"{embedding}.yaml"
        recipe.write_text(yaml.safe_dump(data))
        code, stdout, stderr = run_cli(recipe, "--output-dir", tmp_path / embedding, "--json", "--quiet")
        assert code == 0, stderr
        folder = json.loads(stdout)["artifact"]
        manifest = json.loads(open(f"{folder}/manifest.json").read())
        sizes[embedding] = os.path.getsize(f"{folder}/model.onnx")
        generation = manifest["targets"]["cpu-onnxruntime"]["parity"]["generation"]
        assert generation["prompts"] > 0
        if embedding == "int8":
            assert manifest["model"]["embedding"]["dtype"] == "int8"
            assert manifest["model"]["embedding"]["name"] == "model.embed_tokens"
            rtx = manifest["checks"]["tensorrt_rtx"]  # skipped with its reason (or: packages not installed)
            assert rtx["passed"] is None and ("gathered by row" in rtx["skipped"] or "not installed" in rtx["skipped"])
        else:
            assert manifest["model"]["embedding"] is None
    vocab_hidden = 320 * 64
    assert sizes["float"] - sizes["int8"] > 2 * vocab_hidden  # 4 -> 1 byte per table value
