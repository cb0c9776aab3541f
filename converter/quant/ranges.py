"""Static activation ranges: abs-max, percentile clipping, or the MSE-optimal clip per tensor.

A per-tensor int8 scale trades clipping error (values beyond the range saturate) against rounding
error (a wider range means coarser steps). Abs-max never clips, so one extreme value can make every
other value round to a handful of levels; percentile and MSE clipping spend a little clipping error
to buy much finer steps. Both work from a histogram of |x| over [0, abs-max] collected in one more
calibration pass, the way TensorRT's and ONNX Runtime's histogram calibrators do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from converter.quant.quantize import INT8_MAX, name_matches

HISTOGRAM_BINS = 2048


@dataclass
class Histogram:
    """Counts of |x| in HISTOGRAM_BINS equal bins over [0, amax]."""

    amax: float
    counts: torch.Tensor  # (bins,) float64

    @property
    def edges(self) -> torch.Tensor:
        return torch.linspace(0.0, self.amax, len(self.counts) + 1, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        values = x.detach().abs().reshape(-1).double()
        self.counts += torch.histc(values, bins=len(self.counts), min=0.0, max=self.amax)


def percentile_range(hist: Histogram, percentile: float) -> float:
    """Smallest bin edge below which `percentile`% of |x| lies."""
    cumulative = torch.cumsum(hist.counts, 0) / hist.counts.sum().clamp(min=1)
    index = int(torch.searchsorted(cumulative, torch.tensor(percentile / 100.0, dtype=torch.float64)))
    return float(hist.edges[min(index + 1, len(hist.counts))])


def expected_quant_mse(hist: Histogram, clip: torch.Tensor) -> torch.Tensor:
    """Expected squared error of symmetric int8 quantization with range `clip` (one per candidate).

    Values inside the range carry uniform rounding noise step^2 / 12; values beyond it saturate
    and lose (|x| - clip)^2. Bin centres stand in for the values of each bin.
    """
    centres = (hist.edges[:-1] + hist.edges[1:]) / 2  # (bins,)
    clip = clip.view(-1, 1)  # (candidates, 1)
    step = clip / INT8_MAX
    inside = (step**2 / 12).expand(-1, len(centres))
    outside = (centres.view(1, -1) - clip) ** 2
    err = torch.where(centres.view(1, -1) <= clip, inside, outside)
    return (err * hist.counts.view(1, -1)).sum(dim=1) / hist.counts.sum().clamp(min=1)


def mse_range(hist: Histogram, candidates: int = 256) -> float:
    """The clip, among `candidates` evenly spaced up to abs-max, with the least expected error."""
    clips = torch.linspace(hist.amax / candidates, hist.amax, candidates, dtype=torch.float64)
    return float(clips[int(torch.argmin(expected_quant_mse(hist, clips)))])


def range_method(name: str, default: str, overrides: dict[str, str]) -> str:
    """The method for one linear: the first override pattern that matches its name, else default."""
    for pattern, method in overrides.items():
        if name_matches(name, pattern):
            return method
    return default


@dataclass(frozen=True)
class RangeMethod:
    """One way to choose a tensor's static range: whether it reads the |x| histogram, and the range
    from (abs-max, histogram or None, the recipe's percentile)."""

    needs_histogram: bool
    clip: Callable[[float, Histogram | None, float], float]


# The recipe's `quantization.activations.range` names (recipe.RangeMethod), one entry each.
RANGE_METHODS: dict[str, RangeMethod] = {
    "absmax": RangeMethod(needs_histogram=False, clip=lambda amax, hist, percentile: amax),
    "percentile": RangeMethod(needs_histogram=True, clip=lambda amax, hist, percentile: percentile_range(hist, percentile)),
    "mse": RangeMethod(needs_histogram=True, clip=lambda amax, hist, percentile: mse_range(hist)),
}


def choose_range(method: str, amax: float, hist: Histogram | None, percentile: float) -> float:
    """The static range (abs-max after clipping) for one tensor.

    Raises:
        ValueError: a method that is not in RANGE_METHODS (the recipe refuses those first), or a
            histogram method without a histogram.
    """
    if method not in RANGE_METHODS:
        raise ValueError(f"range method {method!r} is not one of {sorted(RANGE_METHODS)}")
    chosen = RANGE_METHODS[method]
    if amax <= 0:
        return amax
    if chosen.needs_histogram and hist is None:
        raise ValueError(f"range method {method} needs a histogram")
    return chosen.clip(amax, hist, percentile)
