"""Alpha search for SmoothQuant, on a subset of the calibration windows.

* `per_group`: each smoothing group gets the alpha whose W8A8 output error on that group's balance
  linears (against float, on captured calibration inputs) is least. Smoothing preserves the float
  function, so each group's float inputs do not depend on the other groups' alphas: the searches are
  independent and cheap (a few small GEMMs per alpha).
* `per_block`: each block gets the alpha whose smoothed block, weights and activations fake-quantized
  together, reproduces the float block's output best on captured inputs (AWQ's scale search and Intel
  Neural Compressor's auto-alpha judge a block this way): unlike `per_group` it sees how the block's
  groups' errors add up through attention and the MLP. Independent per block, as `per_group`.
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
from converter.quant.sequential import block_outputs
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
def capture_block_calls(model, spec: ArchSpec, windows: Windows, batch_size: int) -> list[list[tuple[tuple, dict]]]:
    """Every block's arguments (positional, keyword) for each batch of `windows`, from a float pass
    without a cache: replaying them runs one block alone, as the whole model would."""
    blocks = list(model.get_submodule(spec.blocks))
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]

    def make_hook(index: int):
        def hook(_module, args, kwargs):
            calls[index].append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for ids, mask in windows.batches(batch_size):
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


@torch.no_grad()
def block_w8a8_error(block, prefix: str, groups, act_amax, alpha: float, spec: ArchSpec, layout, quant: Quantization,
                     calls, reference: list[torch.Tensor]) -> float:
    """W8A8 error of one block smoothed at `alpha`: its groups smoothed, its quantized linears given static
    abs-max ranges measured on the replayed inputs, weights and activations fake-quantized together;
    returns ||out_q - out||^2 / ||out - x||^2 over the replayed calls (the error of the block's update to
    the residual stream, whose size does not depend on alpha).

    Args:
        prefix: the block's module name with a trailing dot ("model.layers.3.").
        groups: the block's enabled smoothing groups.
        act_amax: per-channel input abs-max of the quantized linears (full names), before smoothing.
    """
    from converter.quant.smooth import _smooth_group

    candidate = copy.deepcopy(block)
    for group in groups:
        _smooth_group(candidate, group, act_amax[prefix + group.balance[0]], alpha, spec.norm_offset, layout)
    names = [n[len(prefix):] for n in act_amax if n.startswith(prefix)]
    ranges: dict[str, float] = {}

    def record(name):
        def hook(_module, args):
            ranges[name] = max(ranges.get(name, 0.0), float(args[0].abs().max()))
        return hook

    handles = [candidate.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    try:
        block_outputs(candidate, calls)
    finally:
        for h in handles:
            h.remove()
    apply_fake_quant(candidate, plan_quantization(candidate, names, ranges, quant.model_copy(update={"exclude": []})))
    err = update = 0.0
    for (args, kwargs), ref, out in zip(calls, reference, block_outputs(candidate, calls)):
        x = args[0] if args else kwargs["hidden_states"]
        err += float((out - ref).double().pow(2).sum())
        update += float((ref - x).double().pow(2).sum())
    return err / max(update, 1e-30)


@torch.no_grad()
def per_block_alphas(model, spec: ArchSpec, cfg: Smoothing, quant: Quantization, act_amax, windows: Windows,
                     batch_size: int) -> AlphaSearch:
    """One alpha per block: the grid alpha whose smoothed, fake-quantized block (weights and activations
    together, as AWQ's scale search and Intel Neural Compressor's auto-alpha judge it) reproduces the
    float block's output best on captured inputs. Smoothing keeps the float function, so each block's
    float inputs do not depend on the other blocks' alphas: the searches are independent. The head
    group (outside the blocks) is searched as `per_group` does."""
    layout = head_layout(model.config)
    search = AlphaSearch("per_block", list(cfg.alpha_grid), cfg.search_samples)
    calls = capture_block_calls(model, spec, subset(windows, cfg.search_samples), batch_size)
    blocks = list(model.get_submodule(spec.blocks))
    for index, block in enumerate(track(blocks, "alpha search")):
        prefix = f"{spec.blocks}.{index}."
        groups = [g for g in spec.groups if g.name in cfg.groups and all(prefix + n in act_amax for n in g.balance)
                  and not isinstance(group_scales(block, g, act_amax[prefix + g.balance[0]], 0.5, layout), str)]
        if not groups:
            continue
        reference = block_outputs(block, calls[index])
        errors = [block_w8a8_error(block, prefix, groups, act_amax, alpha, spec, layout, quant, calls[index], reference)
                  for alpha in cfg.alpha_grid]
        best = cfg.alpha_grid[min(range(len(errors)), key=errors.__getitem__)]
        search.errors[prefix[:-1]] = errors
        for g in groups:
            search.chosen[prefix + g.name] = best
        calls[index] = []  # free the captured inputs as the search moves on
    if spec.head_group is not None and spec.head_group.name in cfg.groups:
        head = per_group_alphas(model, spec, cfg.model_copy(update={"groups": [spec.head_group.name]}), act_amax,
                                windows, batch_size, act_mode(quant.activations.level))
        search.chosen.update(head.chosen)
        search.errors.update(head.errors)
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
    if cfg.search == "per_block":
        search = per_block_alphas(model, spec, cfg, quant, act_amax, windows, batch_size)
        return cfg, search.chosen, search
    search = global_alpha(model, spec, cfg, quant, linears, quantized, act_amax, windows, batch_size)
    return cfg.model_copy(update={"alpha": search.chosen["*"]}), None, search
