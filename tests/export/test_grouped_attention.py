"""Grouped-query attention for export (converter/export/grouped_attention.py): HF's eager arithmetic, no repeated K/V."""

import collections
import contextlib

import onnx
import pytest
import torch
from transformers import DynamicCache

from converter.export.exporter import export_fp32
import converter.export.exporter
from converter.export.grouped_attention import GROUPED, for_export, groups_kv_heads
from converter.models.archs import arch_spec
from converter.recipe import Export
from tiny_models import DECODERS, build_tiny

GQA = [a for a in DECODERS if groups_kv_heads(build_tiny(a, outliers=False))]


def expands(path) -> int:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)["Expand"]


def test_the_table_has_grouped_and_ungrouped_decoders():
    # the tiny configs give GQA to the families that have it; the rest must keep their own attention
    assert {"llama", "qwen3", "gemma2", "phi3"} <= set(GQA)
    assert {"opt", "bloom", "gpt2", "phi"}.isdisjoint(GQA)


@pytest.mark.parametrize("arch", DECODERS)
def test_same_logits_as_eager_with_padding_and_a_cache(arch):
    model = build_tiny(arch).eval()
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row: the mask is not plain causal

    def prefill_and_step():
        cache = DynamicCache(config=model.config)
        first = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        step = model(input_ids=ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                     past_key_values=cache, use_cache=True).logits
        return first, step

    with torch.no_grad():
        eager = prefill_and_step()
        with for_export(model):
            used = model.config._attn_implementation
            grouped = prefill_and_step()
    assert used == (GROUPED if arch in GQA else "eager")
    assert model.config._attn_implementation == "eager"  # restored: calibration and parity stay on HF's eager
    for a, b in zip(eager, grouped):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
def test_export_drops_the_repeat_kv_expands_where_the_table_says(arch, tmp_path, monkeypatch):
    model = build_tiny(arch).eval()
    grouped = export_fp32(model, tmp_path / "grouped.onnx", Export(kv_cache=True))
    monkeypatch.setattr(converter.export.exporter, "for_export", lambda m, enabled: contextlib.nullcontext(m))
    eager = export_fp32(model, tmp_path / "eager.onnx", Export(kv_cache=True))

    # repeat_kv: one Expand for the keys and one for the values of every block; Gemma 3 keeps them
    # (its table entry: the grouped form would unfuse its k_norm in ONNX Runtime)
    dropped = 2 * model.config.num_hidden_layers if arch_spec(model).grouped_attention else 0
    assert expands(eager) - expands(grouped) == dropped
    assert (arch == "gemma3") == (dropped == 0)


def test_a_recipe_layer_map_can_keep_hf_attention(tmp_path):
    from converter.models.archs import spec_from_recipe
    from converter.recipe import Architecture

    model = build_tiny("llama").eval()
    table = arch_spec(model)
    section = {"blocks": table.blocks, "linears": list(table.linears)}
    specs = {flag: spec_from_recipe(Architecture.model_validate({**section, "grouped_attention": flag}))
             for flag in (True, False)}
    paths = {flag: export_fp32(model, tmp_path / f"{flag}.onnx", Export(kv_cache=True), spec)
             for flag, spec in specs.items()}
    assert expands(paths[False]) - expands(paths[True]) == 2 * model.config.num_hidden_layers
