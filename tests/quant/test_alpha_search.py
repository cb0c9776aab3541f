import copy

import pytest
import torch
import torch.nn.functional as F

from converter.models.archs import arch_spec, block_linear_names
from converter.models.text import Windows
from converter.quant.alpha_search import global_alpha, per_group_alphas
from converter.quant.calibrate import collect_input_amax
from converter.quant.quantize import FakeQuantLinear, apply_fake_quant, plan_quantization
from converter.quant.smooth import smooth
from converter.recipe import Quantization, Smoothing
from tiny_models import build_tiny

GRID = [0.0, 0.25, 0.5, 0.75, 0.95]
KEY = "model.layers.1.attn_in"
QKV = [f"model.layers.1.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]


def setup(arch="llama"):
    model = build_tiny(arch)
    spec = arch_spec(model)
    linears = block_linear_names(model, spec)
    quantized = linears[:-1]
    windows = Windows(torch.randint(0, 300, (6, 40), generator=torch.Generator().manual_seed(5)), "t", 6)
    return model, spec, linears, quantized, windows, collect_input_amax(model, quantized, windows, 2)


def group_error_by_real_smoothing(model, spec, amax, windows, smoothing: Smoothing):
    """Independent path: smooth a copy in place, fake-quantize q/k/v, compare their outputs."""
    smoothed = copy.deepcopy(model)
    smooth(smoothed, amax, smoothing, spec)
    sample = Windows(windows.input_ids[:2], "t", 2)
    stats = collect_input_amax(smoothed, QKV, sample, 2)
    plan = plan_quantization(smoothed, QKV, stats.absmax_ranges(), Quantization(exclude=[]))
    outputs = {}
    for name, m in (("float", model), ("quant", apply_fake_quant(smoothed, plan))):
        hooks = [m.get_submodule(n).register_forward_hook(lambda mod, a, out, n=n, k=name: outputs.setdefault((k, n), out))
                 for n in QKV]
        with torch.no_grad():
            m(sample.input_ids)
        for h in hooks:
            h.remove()
    assert isinstance(smoothed.get_submodule(QKV[0]), FakeQuantLinear)
    err = sum(float((outputs[("quant", n)] - outputs[("float", n)]).pow(2).sum()) for n in QKV)
    ref = sum(float(outputs[("float", n)].pow(2).sum()) for n in QKV)
    return err / ref


def test_per_group_search_errors_match_real_smoothing_and_pick_the_least():
    model, spec, _, _, windows, stats = setup()
    cfg = Smoothing(search="per_group", alpha_grid=GRID, search_samples=2)
    search = per_group_alphas(model, spec, cfg, stats.amax, windows, 2)
    assert len(search.chosen) == 2 * 4 and set(search.errors) == set(search.chosen)
    independent = [group_error_by_real_smoothing(model, spec, stats.amax, windows, Smoothing(alpha=a, groups=["attn_in"]))
                   for a in GRID]
    assert search.errors[KEY] == pytest.approx(independent, rel=1e-3)
    assert search.chosen[KEY] == GRID[independent.index(min(independent))]
    naive = group_error_by_real_smoothing(model, spec, stats.amax, windows, Smoothing(enabled=False))
    assert min(independent) < 0.2 * naive  # planted outliers need smoothing


def test_global_search_picks_least_kl_and_records_every_alpha():
    model, spec, linears, quantized, windows, stats = setup("qwen2")
    cfg = Smoothing(search="global", alpha_grid=[0.0, 0.5, 0.9], search_samples=2)
    search = global_alpha(model, spec, cfg, Quantization(), linears, quantized, stats.amax, windows, 2)
    errors = search.errors["*"]
    assert search.chosen["*"] == cfg.alpha_grid[errors.index(min(errors))]
    assert min(errors) < errors[0]  # some smoothing beats none on planted outliers
    # recompute one grid point inline
    sample = Windows(windows.input_ids[:2], "t", 2)
    candidate = copy.deepcopy(model)
    smooth(candidate, stats.amax, Smoothing(alpha=0.5), spec)
    recal = collect_input_amax(candidate, quantized, sample, 2)
    apply_fake_quant(candidate, plan_quantization(candidate, linears, recal.absmax_ranges(), Quantization()))
    with torch.no_grad():
        ref = F.log_softmax(model(sample.input_ids).logits, -1)
        got = F.log_softmax(candidate(sample.input_ids).logits, -1)
    kl = float(F.kl_div(got, ref, log_target=True, reduction="sum")) / sample.input_ids.numel()
    assert errors[1] == pytest.approx(kl, rel=1e-4)


def test_searched_alphas_are_applied_per_group():
    model, spec, _, _, windows, stats = setup()
    alphas = {KEY: 0.25, "model.layers.0.mlp_down": 0.9}
    report = smooth(model, stats.amax, Smoothing(alpha=0.5), spec, alphas)
    by_key = {f"model.layers.{g.block}.{g.group}": g.alpha for g in report.groups}
    assert by_key[KEY] == 0.25 and by_key["model.layers.0.mlp_down"] == 0.9
    assert by_key["model.layers.0.attn_in"] == 0.5


def block_error_by_real_smoothing(model, spec, amax, windows, smoothing: Smoothing, block: int = 1):
    """Independent path for the per-block search: smooth a whole copy, fake-quantize only block `block`'s
    linears (static abs-max ranges re-measured on the smoothed copy) and compare that block's output
    inside the full model with the float model's."""
    smoothed = copy.deepcopy(model)
    smooth(smoothed, amax, smoothing, spec)
    sample = Windows(windows.input_ids[:2], "t", 2)
    prefix = f"model.layers.{block}."
    names = [n for n in amax if n.startswith(prefix)]
    stats = collect_input_amax(smoothed, names, sample, 2)
    apply_fake_quant(smoothed, plan_quantization(smoothed, names, stats.absmax_ranges(), Quantization(exclude=[])))
    seen = {}

    def keep(key, value):
        seen.setdefault(key, value[0] if isinstance(value, tuple) else value)

    for key, m in (("float", model), ("quant", smoothed)):
        layer = m.get_submodule(prefix[:-1])
        hooks = [layer.register_forward_pre_hook(
                     lambda mod, args, kwargs, k=key: keep((k, "in"), args[0] if args else kwargs["hidden_states"]),
                     with_kwargs=True),
                 layer.register_forward_hook(lambda mod, args, out, k=key: keep((k, "out"), out))]
        with torch.no_grad():
            m(sample.input_ids)
        for h in hooks:
            h.remove()
    assert torch.allclose(seen[("quant", "in")], seen[("float", "in")], atol=1e-4)  # block 0 float: same input
    err = float((seen[("quant", "out")] - seen[("float", "out")]).double().pow(2).sum())
    return err / float((seen[("float", "out")] - seen[("float", "in")]).double().pow(2).sum())


def test_per_block_search_scores_whole_blocks_and_applies_one_alpha_per_block():
    from converter.quant.alpha_search import choose_alphas

    model, spec, linears, quantized, windows, stats = setup()
    cfg = Smoothing(search="per_block", alpha_grid=GRID, search_samples=2)
    applied, alphas, search = choose_alphas(model, spec, cfg, Quantization(exclude=[]), linears, quantized,
                                            stats.amax, windows, 2)
    assert search.mode == "per_block" and set(search.errors) == {"model.layers.0", "model.layers.1"}
    independent = [block_error_by_real_smoothing(model, spec, stats.amax, windows, Smoothing(alpha=a)) for a in GRID]
    assert search.errors["model.layers.1"] == pytest.approx(independent, rel=1e-3)
    best = GRID[independent.index(min(independent))]
    assert {k: v for k, v in alphas.items() if k.startswith("model.layers.1.")} == {
        f"model.layers.1.{g}": best for g in ("attn_in", "mlp_in", "mlp_down", "attn_out")}
    naive = block_error_by_real_smoothing(model, spec, stats.amax, windows, Smoothing(enabled=False))
    assert min(independent) < 0.5 * naive  # planted outliers need smoothing, and the search finds it
    report = smooth(model, stats.amax, applied, spec, alphas)
    assert {(g.block, g.alpha) for g in report.groups if g.block == 1} == {(1, best)}
