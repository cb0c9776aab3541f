import math

import numpy as np
import pytest
import torch

from converter.models.archs import arch_spec, block_linear_names
from converter.models.text import Windows
from converter.quant.calibrate import activation_ranges, collect_input_amax
from converter.quant.quantize import activation_scale, fake_quantize_activation
from converter.quant.ranges import HISTOGRAM_BINS, Histogram, choose_range, expected_quant_mse, mse_range, percentile_range, range_method
from converter.recipe import ActivationQuant
from tiny_models import build_tiny


def histogram(x: torch.Tensor) -> Histogram:
    hist = Histogram(float(x.abs().max()), torch.zeros(HISTOGRAM_BINS, dtype=torch.float64))
    hist.add(x)
    return hist


def quant_mse(x: torch.Tensor, rng: float) -> float:
    return float((fake_quantize_activation(x, activation_scale(rng)) - x).pow(2).mean())


def test_mse_clip_beats_absmax_with_a_single_extreme_outlier():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    x[1234] = 400.0  # one value ~100x the rest
    hist = histogram(x)
    clip = mse_range(hist)
    # The outlier's own clipping error counts too, so the optimum trades it against the bulk's
    # rounding noise (about half way here) rather than clipping at the bulk.
    assert clip < 0.75 * 400.0
    assert quant_mse(x, clip) < 0.6 * quant_mse(x, 400.0)
    # ...and no other candidate clip does better on the real tensor
    grid = torch.linspace(400.0 / 256, 400.0, 256)
    assert quant_mse(x, clip) <= min(quant_mse(x, float(c)) for c in grid) * 1.02


def test_expected_error_model_matches_real_quantization():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1)) * 3
    hist = histogram(x)
    for clip in (2.0, 6.0, float(x.abs().max())):
        predicted = float(expected_quant_mse(hist, torch.tensor([clip], dtype=torch.float64))[0])
        assert predicted == pytest.approx(quant_mse(x, clip), rel=0.1)


@pytest.mark.parametrize("dist, percentile", [("uniform", 99.0), ("normal", 99.9)])
def test_percentile_range_is_the_upper_edge_of_the_bin_holding_the_percentile(dist, percentile):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(100_000, generator=g) if dist == "uniform" else torch.randn(100_000, generator=g) * 3
    hist = histogram(x)
    # inline, from the raw values: the ceil(p * n)-th smallest |x| lies in bin k; the range is that bin's
    # upper edge. An answer one bin (1/2048 of abs-max) off misses by far more than rel 1e-12.
    values = np.sort(x.abs().double().numpy())
    kth = values[math.ceil(percentile / 100 * len(values)) - 1]
    width = hist.amax / HISTOGRAM_BINS
    expected = (math.floor(kth / width) + 1) * width
    assert percentile_range(hist, percentile) == pytest.approx(expected, rel=1e-12)
    assert abs(expected - kth) < width  # the bin edge is within one bin of the true percentile
    assert percentile_range(hist, 100.0) == pytest.approx(float(x.abs().max()), rel=1e-12)


def test_range_method_overrides_by_pattern():
    overrides = {"*.down_proj": "mse", "model.layers.0.*": "percentile"}
    assert range_method("model.layers.3.mlp.down_proj", "absmax", overrides) == "mse"
    assert range_method("model.layers.0.mlp.down_proj", "absmax", overrides) == "mse"  # first match wins
    assert range_method("model.layers.0.self_attn.q_proj", "absmax", overrides) == "percentile"
    assert range_method("lm_head", "absmax", overrides) == "absmax"


def test_activation_ranges_on_a_model_clip_only_where_asked():
    model = build_tiny("llama")
    names = block_linear_names(model, arch_spec(model))[:-1]
    windows = Windows(torch.randint(0, 300, (8, 48), generator=torch.Generator().manual_seed(3)), "t", 8)
    stats = collect_input_amax(model, names, windows, 4)
    cfg = ActivationQuant(range="absmax", range_overrides={"*.down_proj": "mse", "*.q_proj": "percentile"}, percentile=99.0)
    ranges, methods = activation_ranges(model, stats, windows, 4, cfg)
    absmax = stats.absmax_ranges()
    for name in names:
        if name.endswith("down_proj"):
            assert methods[name] == "mse" and ranges[name] < absmax[name]
        elif name.endswith("q_proj"):
            assert methods[name] == "percentile" and ranges[name] < absmax[name]
        else:
            assert methods[name] == "absmax" and ranges[name] == absmax[name]


def test_the_recipe_names_exactly_the_registered_range_methods():
    from typing import get_args

    from converter.quant.ranges import RANGE_METHODS
    from converter.recipe import RangeMethod

    assert set(get_args(RangeMethod)) == set(RANGE_METHODS)


def test_an_unknown_range_method_is_an_error_not_mse():
    """Before the registry an unknown name silently took the MSE clip; the recipe refuses it first."""
    from converter.errors import UserError
    from converter.recipe import ActivationQuant

    with pytest.raises(ValueError, match="'median' is not one of"):
        choose_range("median", 8.0, None, 99.9)
    with pytest.raises((ValueError, UserError)):
        ActivationQuant(range="median")
    with pytest.raises((ValueError, UserError)):
        ActivationQuant(range_overrides={"*.down_proj": "median"})
