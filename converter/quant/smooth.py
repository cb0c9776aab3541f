"""Stage *smooth*: SmoothQuant, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha).

The activation channel j is divided by s_j in the layer that produces it (a norm's weight, or the
rows of a linear) and the consuming linears' input column j is multiplied by s_j. In exact arithmetic
the float model computes the same function; the activation outliers move into the weights, which
per-channel weight quantization absorbs easily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from converter.models.archs import ArchSpec, SmoothGroup, head_layout

if TYPE_CHECKING:  # annotations only: the recipe sits above the stages
    from converter.recipe import Smoothing


@dataclass(frozen=True)
class GroupRecord:
    """What smoothing did to one group in one block."""

    block: int | None  # None for the head group (final norm -> lm_head)
    group: str
    alpha: float
    act_amax_before: float
    act_amax_after: float
    outlier_ratio_before: float  # max channel / median channel of the activation abs-max
    outlier_ratio_after: float
    scale_min: float
    scale_max: float
    linears: tuple[str, ...] = ()  # full names of the balance linears


@dataclass
class SmoothReport:
    groups: list[GroupRecord]
    skipped: list[str]  # "<block>.<group>: reason"

    def to_dict(self) -> dict:
        return {"groups": [asdict(g) for g in self.groups], "skipped": self.skipped}


def smoothing_scales(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel smoothing factors (C,), float32.

    Channels that never fired (act 0) or have all-zero weights keep s = 1: any other value would
    only blow up the producing layer's weight for no benefit.
    """
    if act_amax.shape != weight_amax.shape:
        raise ValueError(f"act_amax {tuple(act_amax.shape)} vs weight_amax {tuple(weight_amax.shape)}")
    scales = act_amax.pow(alpha) / weight_amax.pow(1.0 - alpha)
    dead = (act_amax <= 0) | (weight_amax <= 0) | ~torch.isfinite(scales)
    return torch.where(dead, torch.ones_like(scales), scales.clamp(min=1e-5)).float()


def column_amax(weight: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """max |W[:, j]| per input column, `rows` rows at a time (a maximum is exact in any order, and a
    large head needs no |W| temporary of its own size)."""
    return torch.stack([weight[i: i + rows].abs().amax(dim=0) for i in range(0, weight.shape[0], rows)]).amax(dim=0)


def _ratio(amax: torch.Tensor) -> float:
    return float(amax.max() / amax.median().clamp(min=1e-12))


@torch.no_grad()
def group_scales(root, group: SmoothGroup, act_amax, alpha, layout) -> tuple[torch.Tensor, torch.Tensor] | str:
    """Smoothing factors of one group: (s per producer channel, s per balance input column).

    Returns a reason string instead when the group cannot be smoothed.
    """
    prev = root.get_submodule(group.prev)
    if getattr(prev, "weight", None) is None:  # ModernBERT's first block: attn_norm is nn.Identity
        return f"{group.name}: {group.prev} is {type(prev).__name__}, no weight to fold a scale into"
    balance = [root.get_submodule(n) for n in group.balance]
    weight_amax = torch.stack([column_amax(lin.weight) for lin in balance]).amax(dim=0).float()
    act = act_amax
    if group.prev_kind != "linear_heads":
        scales = smoothing_scales(act, weight_amax, alpha)
        return scales, scales
    # o_proj input channel (h, d) reads v_proj output channel (h // group_size, d): a scale can
    # only move through v_proj if it is shared by every query head reading that kv head.
    n_kv, g, hd = layout.num_kv_heads, layout.group_size, layout.head_dim
    rows = prev.out_features if group.prev_rows is None else len(group.prev_rows.indices(layout))
    if rows != n_kv * hd or balance[0].in_features != n_kv * g * hd:
        return f"{group.name}: head layout does not match v_proj/o_proj shapes"
    act = act.view(n_kv, g, hd).amax(dim=1).reshape(-1)
    weight_amax = weight_amax.view(n_kv, g, hd).amax(dim=1).reshape(-1)
    scales = smoothing_scales(act, weight_amax, alpha)  # (n_kv * hd,)
    return scales, scales.view(n_kv, 1, hd).expand(n_kv, g, hd).reshape(-1)


@torch.no_grad()
def _smooth_group(root, group: SmoothGroup, act_amax, alpha, norm_offset, layout) -> GroupRecord | str:
    result = group_scales(root, group, act_amax, alpha, layout)
    if isinstance(result, str):
        return result
    scales, col_scales = result
    prev = root.get_submodule(group.prev)
    if group.prev_kind == "norm":
        # y = x_hat * (offset + w): dividing the output by s means offset + w' = (offset + w) / s.
        prev.weight.copy_((norm_offset + prev.weight) / scales - norm_offset)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(scales)
    else:
        # a fused producer (qkv_proj, gate_up_proj) scales only the rows that feed the balance linears
        rows = slice(None) if group.prev_rows is None else group.prev_rows.indices(layout)
        prev.weight[rows] = prev.weight[rows] / scales.view(-1, 1)
        if prev.bias is not None:
            prev.bias[rows] = prev.bias[rows] / scales
    for name in group.balance:
        root.get_submodule(name).weight.mul_(col_scales.view(1, -1))
    after = act_amax / col_scales
    return GroupRecord(
        block=None,
        group=group.name,
        alpha=alpha,
        act_amax_before=float(act_amax.max()),
        act_amax_after=float(after.max()),
        outlier_ratio_before=_ratio(act_amax),
        outlier_ratio_after=_ratio(after),
        scale_min=float(scales.min()),
        scale_max=float(scales.max()),
    )


def untie_output_embeddings(model: torch.nn.Module) -> bool:
    """Give a tied lm_head its own weight, so smoothing it leaves the input embedding exact."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return False
    head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False  # so nothing re-ties them (save, export, post_init)
    return True


def iter_groups(model: torch.nn.Module, spec: ArchSpec, cfg: Smoothing):
    """Yield (key, root module, group) for every enabled group: blocks first, then the head.

    `key` names the group in reports and in per-group alphas: "model.layers.3.mlp_down", "head_in".
    """
    for index, block in enumerate(model.get_submodule(spec.blocks)):
        for group in spec.groups:
            if group.name in cfg.groups:
                yield f"{spec.blocks}.{index}.{group.name}", block, group
    if spec.head_group is not None and spec.head_group.name in cfg.groups:
        yield spec.head_group.name, model, spec.head_group


def balance_names(key: str, group: SmoothGroup) -> list[str]:
    """Full module names of a group's balance linears."""
    prefix = key[: -len(group.name)]
    return [prefix + name for name in group.balance]


@torch.no_grad()
def smooth(
    model: torch.nn.Module,
    act_amax: dict[str, torch.Tensor],
    cfg: Smoothing,
    spec: ArchSpec,
    alphas: dict[str, float] | None = None,
    where: Callable[[str], bool] | None = None,
) -> SmoothReport:
    """Apply SmoothQuant in place to every enabled group of every block (and the head group).

    Args:
        act_amax: per-channel input abs-max of the quantized linears (from *calibrate*), keyed by
            full module name. A group whose balance linears were not calibrated (kept in float) is
            skipped: smoothing it would only move outliers into weights nobody quantizes.
        alphas: per-group alpha by group key (from an alpha search); elsewhere the group's
            `cfg.group_alpha`, else `cfg.alpha`.
        where: smooth only the groups whose key it accepts (a block-streamed model smooths each
            block when it is read: converter/quant/sequential.py).

    Returns:
        One record per smoothed group, and the groups skipped with the reason.
    """
    report = SmoothReport(groups=[], skipped=[])
    if not cfg.enabled:
        return report
    layout = head_layout(model.config)
    for key, root, group in list(iter_groups(model, spec, cfg)):
        if where is not None and not where(key):
            continue
        names = balance_names(key, group)
        if not all(n in act_amax for n in names):
            report.skipped.append(f"{key}: {', '.join(group.balance)} not quantized")
            continue
        if group is spec.head_group:
            untie_output_embeddings(model)
        alpha = (alphas or {}).get(key, cfg.group_alpha.get(group.name, cfg.alpha))
        result = _smooth_group(root, group, act_amax[names[0]], alpha, spec.norm_offset, layout)
        if isinstance(result, str):
            report.skipped.append(f"{key[: -len(group.name)]}{result}")
        else:
            block = int(key.split(".")[-2]) if group is not spec.head_group else None
            report.groups.append(GroupRecord(**{**asdict(result), "block": block, "linears": tuple(names)}))
    return report
