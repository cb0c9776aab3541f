"""Sensitivity analysis and float fallback.

Each quantized linear's sensitivity is how much the fake-quant model's error (mean KL of the next-token
distribution against float, on calibration windows) drops when that linear alone goes back to float.
The most sensitive linears are then kept in float, one at a time, until the recipe's target is met,
never exceeding the budget on the share of linear MACs left in float.

Scoring a linear costs one model pass over the windows, so by default only the `candidates` linears
with the largest local error (their own W8A8 output against float, all measured in one hooked pass)
are scored; the rest keep a sensitivity of None in the report.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from converter.models.text import Windows
from converter.progress import track
from converter.quant.calibrate import run_hooked
from converter.quant.quantize import QuantPlan, apply_fake_quant, fake_quantize_input, fake_quantize_weight

if TYPE_CHECKING:  # annotations only: the recipe sits above the stages
    from converter.recipe import Fallback


@dataclass
class Errors:
    kl: float  # mean KL(float || quantized) per token
    ppl_ratio: float  # quantized / float perplexity on the same windows


@dataclass
class FallbackReport:
    """What the analysis measured and which linears it kept in float (recorded in the manifest)."""

    base: Errors
    final: Errors
    sensitivity: dict[str, float | None]  # linear -> KL drop when it alone is float; None: not scored
    local_error: dict[str, float] = field(default_factory=dict)  # linear -> its own W8A8 output rel. error
    fallback: list[str] = field(default_factory=list)
    float_mac_share: float = 0.0
    target_met: bool = False

    def to_dict(self) -> dict:
        return {**self.__dict__, "base": self.base.__dict__, "final": self.final.__dict__}


class _Scorer:
    """Errors of a (partly) fake-quantized model against the float model on fixed windows."""

    def __init__(self, model, windows: Windows, batch_size: int):
        self.batches = list(windows.batches(batch_size))
        self.reference = [self._logp(model, ids, mask) for ids, mask in self.batches]
        self.ref_nll = sum(self._nll(lp, ids) for lp, (ids, _) in zip(self.reference, self.batches))
        self.tokens = sum(ids.numel() for ids, _ in self.batches)
        self.predicted = sum(ids[:, 1:].numel() for ids, _ in self.batches)

    @staticmethod
    @torch.no_grad()
    def _logp(model, ids, mask):
        return F.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)

    @staticmethod
    def _nll(logp, ids) -> float:
        return -float(logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).sum())

    def __call__(self, model) -> Errors:
        kl = nll = 0.0
        for ref, (ids, mask) in zip(self.reference, self.batches):
            logp = self._logp(model, ids, mask)
            kl += float((ref.exp() * (ref - logp)).sum())
            nll += self._nll(logp, ids)
        return Errors(kl=kl / self.tokens, ppl_ratio=math.exp((nll - self.ref_nll) / self.predicted))


def _met(errors: Errors, cfg: Fallback) -> bool:
    return (cfg.target_kl is None or errors.kl <= cfg.target_kl) and (
        cfg.target_ppl_ratio is None or errors.ppl_ratio <= cfg.target_ppl_ratio
    )


def _swap(model, name: str, module) -> torch.nn.Module:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old


@torch.no_grad()
def local_errors(model, plan: QuantPlan, windows: Windows, batch_size: int) -> dict[str, float]:
    """||W8A8(x) - x W^T||^2 / ||x W^T||^2 of every planned linear on its own float input (one pass)."""
    sums = {n: [0.0, 0.0] for n in plan.linears}
    deq = {}

    def record(name, x):
        quant, weight = plan.linears[name], model.get_submodule(name).weight
        if name not in deq:
            deq[name] = fake_quantize_weight(weight, quant.weight_scale)
        y = F.linear(x, weight)
        err = F.linear(fake_quantize_input(x, quant.act_mode, quant.act_scale), deq[name]) - y
        sums[name][0] += float(err.pow(2).sum())
        sums[name][1] += float(y.pow(2).sum())

    run_hooked(model, list(plan.linears), windows, batch_size, "local error", record)
    return {n: e / max(t, 1e-30) for n, (e, t) in sums.items()}


@torch.no_grad()
def sensitivity_fallback(model, plan: QuantPlan, windows: Windows, batch_size: int, cfg: Fallback) -> FallbackReport:
    """Rank quantized linears by sensitivity and keep the most sensitive in float until the target.

    Args:
        model: the float model as it will be exported (smoothed); left unchanged.
        plan: the static quantization plan to start from.

    Returns:
        The report; its `fallback` lists the linears to drop from the plan (see `without`).
    """
    sample = Windows(windows.input_ids[: cfg.samples], windows.sha256, windows.total_windows)
    score = _Scorer(model, sample, batch_size)
    quantized = apply_fake_quant(copy.deepcopy(model), plan)
    base = score(quantized)
    macs = {n: q.in_features * q.out_features for n, q in plan.linears.items()}
    budget = cfg.max_float_mac_share * sum(macs.values())
    local = local_errors(model, plan, sample, batch_size)
    fits = [n for n in plan.linears if macs[n] <= budget]  # a linear over the budget alone is never a candidate
    scored = sorted(fits, key=local.get, reverse=True)[: cfg.candidates or len(fits)]
    sensitivity: dict[str, float | None] = {n: None for n in plan.linears}
    for name in track([n for n in plan.linears if n in scored], "sensitivity"):
        fake = _swap(quantized, name, model.get_submodule(name))
        sensitivity[name] = base.kl - score(quantized).kl
        _swap(quantized, name, fake)
    report = FallbackReport(base=base, final=base, sensitivity=sensitivity, local_error=local,
                            target_met=_met(base, cfg))
    per_mac = cfg.rank == "sensitivity_per_mac"
    for name in sorted(scored, key=lambda n: sensitivity[n] / macs[n] if per_mac else sensitivity[n], reverse=True):
        if report.target_met:
            break
        if sensitivity[name] <= 0 or sum(macs[n] for n in report.fallback) + macs[name] > budget:
            continue
        _swap(quantized, name, model.get_submodule(name))
        report.fallback.append(name)
        report.final = score(quantized)
        report.target_met = _met(report.final, cfg)
    report.float_mac_share = sum(macs[n] for n in report.fallback) / max(sum(macs.values()), 1)
    return report


def without(plan: QuantPlan, names: list[str]) -> QuantPlan:
    """The plan with `names` kept in float."""
    return replace(
        plan,
        linears={n: q for n, q in plan.linears.items() if n not in names},
        excluded=[*plan.excluded, *names],
    )
