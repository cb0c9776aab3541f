"""Alpha search for SmoothQuant, on a subset of the calibration windows.

* `per_group`: each smoothing group gets the alpha whose W8A8 output error on that group's balance
  linears (against float, on captured calibration inputs) is least. Smoothing preserves the float
  function, so each group's float inputs do not depend on the other groups' alphas: the searches are
  independent and cheap (a few small GEMMs per alpha).
* `global`: the SmoothQuant paper's method: one alpha for the whole model, the one whose fake-quant
  model has the least KL divergence from the float model's next-token distribution.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from converter.models.archs import ArchSpec, head_layout
from converter.models.text import Windows
from converter.progress import track
from converter.quant.calibrate import run_hooked, collect_input_amax
from converter.quant.quantize import (
    act_mode,
    activation_scale,
    apply_fake_quant,
    fake_quantize_input,
    fake_quantize_weight,
    plan_quantization,
    weight_scales,
)
from converter.quant.smooth import balance_names, group_scales, iter_groups, smooth

if TYPE_CHECKING:  # annotations only: the recipe sits above the stages
    from converter.recipe import Quantization, Smoothing


@dataclass
class AlphaSearch:
    """What the search tried and chose (recorded in the manifest)."""

    mode: str
    grid: list[float]
    samples: int
    chosen: dict[str, float] = field(default_factory=dict)  # group key -> alpha ("*" for global)
    errors: dict[str, list[float]] = field(default_factory=dict)  # group key -> error per grid alpha

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def subset(windows: Windows, samples: int) -> Windows:
    return Windows(windows.input_ids[:samples], windows.sha256, windows.total_windows)


@torch.no_grad()
def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], col_scales: torch.Tensor, mode: str = "static") -> float:
    """Relative squared error of W8A8 (x / s) @ (W * s)^T against float x @ W^T, summed over weights.

    x: (tokens, C_in); weights: [(C_out, C_in)]; col_scales: (C_in,); mode: the activation mode
    (quantize.ACT_MODES; a static range is the abs-max of `x / s`).
    """
    xs = x / col_scales
    xq = fake_quantize_input(xs, mode, activation_scale(float(xs.abs().max())))
    err = ref = 0.0
    for w in weights:
        ws = w * col_scales
        wq = fake_quantize_weight(ws, weight_scales(ws))
        y = x @ w.T
        err += float((xq @ wq.T - y).pow(2).sum())
        ref += float(y.pow(2).sum())
    return err / max(ref, 1e-30)


@torch.no_grad()
def per_group_alphas(model, spec: ArchSpec, cfg: Smoothing, act_amax, windows: Windows, batch_size: int,
                     mode: str = "static") -> AlphaSearch:
    """Choose each group's alpha by its balance linears' W8A8 output error (activations quantized
    as `mode` does: per-token modes see each captured token row separately)."""
    groups = [(k, root, g) for k, root, g in iter_groups(model, spec, cfg) if balance_names(k, g)[0] in act_amax]
    first = {balance_names(k, g)[0] for k, _, g in groups}
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in first}
    run_hooked(model, sorted(first), subset(windows, cfg.search_samples), batch_size, "capture",
                lambda n, x: captured[n].append(x.reshape(-1, x.shape[-1])))
    layout = head_layout(model.config)
    search = AlphaSearch("per_group", list(cfg.alpha_grid), cfg.search_samples)
    for key, root, group in track(groups, "alpha search"):
        names = balance_names(key, group)
        x = torch.cat(captured.pop(names[0]))
        weights = [model.get_submodule(n).weight for n in names]
        errors = []
        for alpha in cfg.alpha_grid:
            result = group_scales(root, group, act_amax[names[0]], alpha, layout)
            errors.append(float("inf") if isinstance(result, str) else w8a8_error(x, weights, result[1], mode))
        search.errors[key] = errors
        search.chosen[key] = cfg.alpha_grid[min(range(len(errors)), key=errors.__getitem__)]
    return search


@torch.no_grad()
def _kl_to_reference(model, windows: Windows, reference: list[torch.Tensor], batch_size: int) -> float:
    total = count = 0.0
    for (ids, mask), ref_logp in zip(windows.batches(batch_size), reference):
        logp = F.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        total += float((ref_logp.exp() * (ref_logp - logp)).sum())
        count += ids.numel()
    return total / count


@torch.no_grad()
def global_alpha(model, spec: ArchSpec, cfg: Smoothing, quant: Quantization, linears: list[str],
                 quantized: list[str], act_amax, windows: Windows, batch_size: int) -> AlphaSearch:
    """One alpha for the model: the grid point whose fake-quant model is closest (KL) to float."""
    sample = subset(windows, cfg.search_samples)
    reference = [F.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
                 for ids, mask in sample.batches(batch_size)]
    errors = []
    for alpha in track(cfg.alpha_grid, "alpha search"):
        candidate = copy.deepcopy(model)
        smooth(candidate, act_amax, cfg.model_copy(update={"alpha": alpha}), spec)
        stats = collect_input_amax(candidate, quantized, sample, batch_size, "re-calibrate")
        apply_fake_quant(candidate, plan_quantization(candidate, linears, stats.absmax_ranges(), quant))
        errors.append(_kl_to_reference(candidate, sample, reference, batch_size))
        del candidate
    best = cfg.alpha_grid[min(range(len(errors)), key=errors.__getitem__)]
    return AlphaSearch("global", list(cfg.alpha_grid), cfg.search_samples, chosen={"*": best}, errors={"*": errors})


def choose_alphas(model, spec: ArchSpec, cfg: Smoothing, quant: Quantization, linears: list[str],
                  quantized: list[str], act_amax, windows: Windows, batch_size: int):
    """Run the recipe's alpha search, if any.

    Returns:
        (smoothing config to apply, per-group alphas or None, AlphaSearch record or None).
    """
    if not cfg.enabled or cfg.search == "off":
        return cfg, None, None
    if cfg.search == "per_group":
        search = per_group_alphas(model, spec, cfg, act_amax, windows, batch_size, act_mode(quant.activations.level))
        return cfg, search.chosen, search
    search = global_alpha(model, spec, cfg, quant, linears, quantized, act_amax, windows, batch_size)
    return cfg.model_copy(update={"alpha": search.chosen["*"]}), None, search
