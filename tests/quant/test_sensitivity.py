import copy

import pytest
import torch

from converter.models.archs import arch_spec, block_linear_names
from converter.models.text import Windows
from converter.quant.calibrate import collect_input_amax
from converter.quant.quantize import apply_fake_quant, plan_quantization
from converter.quant.sensitivity import _Scorer, sensitivity_fallback, without
from converter.recipe import Fallback, Quantization
from tiny_models import build_tiny

PLANTED = "model.layers.1.mlp.down_proj"


def planted_model():
    """No smoothing anywhere; one activation outlier pair that only block 1's down_proj sees."""
    model = build_tiny("llama", outliers=False)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[7, :] *= 1000.0
        model.model.layers[1].mlp.down_proj.weight[:, 7] /= 1000.0
    names = block_linear_names(model, arch_spec(model))[:-1]
    windows = Windows(torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(9)), "t", 4)
    plan = plan_quantization(model, names, collect_input_amax(model, names, windows, 2).absmax_ranges(),
                             Quantization(exclude=[]))
    return model, plan, windows


def test_fallback_is_exactly_the_planted_sensitive_layer():
    model, plan, windows = planted_model()
    # the error with only the planted layer in float, measured independently of the search
    score = _Scorer(model, windows, 2)
    only_planted = score(apply_fake_quant(copy.deepcopy(model), without(plan, [PLANTED])))
    cfg = Fallback(enabled=True, target_kl=only_planted.kl * 1.5, max_float_mac_share=0.15, samples=4)
    report = sensitivity_fallback(model, plan, windows, 2, cfg)
    scored = {n: v for n, v in report.sensitivity.items() if v is not None}
    assert max(scored, key=scored.get) == PLANTED
    assert report.fallback == [PLANTED] and report.target_met
    assert report.final.kl == pytest.approx(only_planted.kl, rel=1e-6)
    assert report.base.kl > 10 * report.final.kl
    assert report.float_mac_share == pytest.approx(64 * 160 / sum(q.in_features * q.out_features
                                                                   for q in plan.linears.values()))


def test_only_the_largest_local_errors_are_scored():
    model, plan, windows = planted_model()
    only_planted = _Scorer(model, windows, 2)(apply_fake_quant(copy.deepcopy(model), without(plan, [PLANTED])))
    cfg = Fallback(enabled=True, target_kl=only_planted.kl * 1.5, max_float_mac_share=0.15, samples=4, candidates=2)
    report = sensitivity_fallback(model, plan, windows, 2, cfg)
    assert max(report.local_error, key=report.local_error.get) == PLANTED  # the cheap pass finds it
    assert sum(v is not None for v in report.sensitivity.values()) == 2
    assert report.fallback == [PLANTED] and report.target_met


def test_budget_is_never_exceeded():
    model, plan, windows = planted_model()
    report = sensitivity_fallback(model, plan, windows, 2, Fallback(enabled=True, target_kl=0.0, max_float_mac_share=0.05))
    assert PLANTED not in report.fallback  # 11.9% of the MACs: over the 5% budget
    assert report.float_mac_share <= 0.05 and not report.target_met


def test_nothing_falls_back_when_the_target_is_already_met():
    model, plan, windows = planted_model()
    report = sensitivity_fallback(model, plan, windows, 2, Fallback(enabled=True, target_kl=1e9))
    assert report.fallback == [] and report.target_met and report.final == report.base


def test_without_moves_linears_to_float():
    _, plan, _ = planted_model()
    smaller = without(plan, [PLANTED])
    assert PLANTED not in smaller.linears and smaller.excluded[-1] == PLANTED
    assert len(smaller.linears) == len(plan.linears) - 1


def test_per_mac_rank_spends_the_budget_on_the_most_kl_per_mac():
    model, plan, windows = planted_model()
    macs = {n: q.in_features * q.out_features for n, q in plan.linears.items()}
    orders = {}
    for rank in ("sensitivity", "sensitivity_per_mac"):
        cfg = Fallback(enabled=True, target_kl=0.0, max_float_mac_share=1.0, candidates=None, rank=rank)
        report = sensitivity_fallback(model, plan, windows, 2, cfg)
        s = report.sensitivity
        key = (lambda n: s[n] / macs[n]) if rank == "sensitivity_per_mac" else s.get
        assert report.fallback == sorted((n for n in s if s[n] > 0), key=key, reverse=True)
        orders[rank] = report.fallback
    assert orders["sensitivity"] != orders["sensitivity_per_mac"]
    assert len({macs[n] for n in orders["sensitivity"]}) > 1  # the two keys can only differ with mixed sizes
