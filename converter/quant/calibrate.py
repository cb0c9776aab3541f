"""Stage *calibrate*: per-channel abs-max of the inputs of the linears that will be quantized.

Forward pre-hooks fold each batch into a running maximum, so memory does not grow with the number
of calibration samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from converter.errors import UserError
from converter.models.text import Windows
from converter.progress import track
from converter.quant.ranges import HISTOGRAM_BINS, RANGE_METHODS, Histogram, choose_range, range_method

if TYPE_CHECKING:  # annotations only: the recipe sits above the stages
    from converter.recipe import ActivationQuant


class _HeadReached(Exception):
    """Raised by the head's hook to skip computing logits nobody reads."""


@dataclass
class ActStats:
    """Per-channel input abs-max for each hooked linear: name -> (in_features,) float32."""

    amax: dict[str, torch.Tensor]
    batches: int
    tokens: int

    def per_tensor(self, name: str) -> float:
        return float(self.amax[name].max())

    def absmax_ranges(self) -> dict[str, float]:
        """Per-tensor abs-max of every recorded linear (the static range without clipping)."""
        return {name: self.per_tensor(name) for name in self.amax}


@torch.no_grad()
def run_hooked(model, names, windows: Windows, batch_size: int, description: str, on_input) -> tuple[int, int]:
    """Run the windows through `model`, calling on_input(name, x) with each hooked linear's input.

    The head (the lm_head of a causal LM, a fifth of a 135M decoder's FLOPs and a 50 MB logits tensor
    per 256-token window) never runs: when it is hooked, the forward pass stops once its input is
    recorded. Windows with `decode_steps` also run greedy decode steps (converter/quant/decode_steps.py),
    which need the head's logits. Returns (batches, tokens), decoded tokens included.
    """
    from converter.quant.decode_steps import decode_pass

    # Modules outside the base model (lm_head, classifier); none when the model is its own base (BertModel).
    base = model.base_model
    head = set() if base is model else {n for n, _ in model.named_modules() if n and not n.startswith(model.base_model_prefix)}
    recording = {"on": True, "decoding": False}

    def make_hook(name: str):
        def hook(_module, args):
            if recording["on"]:
                on_input(name, args[0].detach())
            if name in head and not recording["decoding"]:  # the head runs last: its input is all we need
                raise _HeadReached

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    runner = model if head & set(names) else base
    batches = tokens = 0
    try:
        total = math.ceil(len(windows.input_ids) / batch_size)
        for ids, mask in track(windows.batches(batch_size), description, total=total):
            try:
                runner(input_ids=ids, attention_mask=mask, use_cache=False)
            except _HeadReached:
                pass
            batches += 1
            tokens += ids.numel()
        if windows.decode_steps and windows.decode_windows:
            recording["decoding"] = True
            tokens += decode_pass(model, windows, batch_size, recording)
    finally:
        for h in handles:
            h.remove()
    return batches, tokens


def collect_input_amax(
    model: torch.nn.Module,
    names: list[str],
    windows: Windows,
    batch_size: int,
    description: str = "calibrate",
) -> ActStats:
    """Run the calibration windows through `model` and record per-channel input abs-max.

    Raises:
        UserError: a linear saw a non-finite activation, or never ran.
    """
    amax: dict[str, torch.Tensor] = {}
    batches, tokens = run_hooked(model, names, windows, batch_size, description,
                                 lambda name, x: record_amax(amax, name, x))
    return checked_stats(amax, names, batches, tokens)


def record_amax(amax: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    """Fold one batch of a linear's input into its running per-channel abs-max."""
    batch_max = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
    prev = amax.get(name)
    amax[name] = batch_max if prev is None else torch.maximum(prev, batch_max)


def checked_stats(amax: dict[str, torch.Tensor], names: list[str], batches: int, tokens: int) -> ActStats:
    """The recorded maxima as ActStats.

    Raises:
        UserError: a linear saw a non-finite activation, or never ran.
    """
    for name in names:
        if name not in amax:
            raise UserError(f"layer {name}: never ran during calibration")
        if not torch.isfinite(amax[name]).all():
            raise UserError(
                f"layer {name}: activation amax is not finite after {batches} calibration batches"
            )
    return ActStats(amax=amax, batches=batches, tokens=tokens)


def collect_input_histograms(
    model: torch.nn.Module, ranges: dict[str, float], windows: Windows, batch_size: int
) -> dict[str, Histogram]:
    """One more pass: a histogram of |input| over [0, abs-max] for each linear in `ranges`."""
    hists = {name: Histogram(amax, torch.zeros(HISTOGRAM_BINS, dtype=torch.float64))
             for name, amax in ranges.items() if amax > 0}
    run_hooked(model, list(hists), windows, batch_size, "histograms", lambda n, x: hists[n].add(x))
    return hists


def activation_ranges(
    model: torch.nn.Module, stats: ActStats, windows: Windows, batch_size: int, cfg: ActivationQuant
) -> tuple[dict[str, float], dict[str, str]]:
    """Static range per linear by the recipe's method (histogram pass only if a method needs it).

    Returns:
        (range per linear, method per linear).
    """
    methods = {n: range_method(n, cfg.range, cfg.range_overrides) for n in stats.amax}
    amax = stats.absmax_ranges()
    needs_hist = {n: amax[n] for n, m in methods.items() if RANGE_METHODS[m].needs_histogram}
    hists = collect_input_histograms(model, needs_hist, windows, batch_size) if needs_hist else {}
    ranges = {n: choose_range(methods[n], amax[n], hists.get(n), cfg.percentile) for n in stats.amax}
    return ranges, methods
