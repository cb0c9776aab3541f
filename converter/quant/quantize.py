"""Stage *quantize*: W8A8 scales, and the PyTorch fake-quant model with the same arithmetic.

Weights: int8, symmetric, one scale per output channel (scale = max|W_row| / 127).
Activations, by level (see recipe.ActivationQuant):
  O3 static: int8, symmetric, one calibrated scale per tensor (scale = range / 127);
  O2 dynamic per tensor: ONNX DynamicQuantizeLinear (uint8, asymmetric, from the tensor's min/max);
  O1 dynamic per token: int8, symmetric, scale = max|x_token| / 127 for every token.
The functions below are the single definition of that arithmetic: the ONNX exporter writes the
int8 weights they produce, and the fake-quant reference computes with them. The reference sums its
integer products as the int8 kernels do (`FakeQuantLinear`), not as a float MatMul of dequantized
values would: the two orders differ in the last bits, and a last bit is enough to move a later
activation across a rounding boundary.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from converter.errors import UserError

if TYPE_CHECKING:  # annotations only: the recipe sits above the stages
    from converter.recipe import Quantization

INT8_MIN, INT8_MAX = -128, 127
WEIGHT_QMAX = 127  # symmetric weights use [-127, 127] so the range is the same on both sides
TINY_AMAX = 1e-30  # keeps a per-token scale positive for an all-zero token
ACT_MODES = ("static", "dynamic_per_tensor", "dynamic_per_token")


def weight_scales(weight: torch.Tensor, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """(out,) float32 per-output-channel scales max|W_row| / qmax; an all-zero row gets scale 1 (any
    positive works). `qmax` other than 127 only serves yardsticks of other widths (2**(bits-1) - 1)."""
    amax = weight.detach().abs().amax(dim=1).float()
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def _round_weight(weight: torch.Tensor, scales: torch.Tensor, qmax: int) -> torch.Tensor:
    """round_half_even(W / scale_row), clamped to [-qmax, qmax], as float32."""
    return torch.round(weight.detach().float() / scales.view(-1, 1)).clamp(-qmax, qmax)


def quantize_weight(weight: torch.Tensor, scales: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """(out, in) int8 = round_half_even(W / scale_row), clamped to [-127, 127].

    `rows` rows at a time: each element is computed alone, so the result is the same, and a large
    table (a 151936-row head: 0.9 GB in fp32) needs no float temporaries of its own size.
    """
    out = torch.empty(weight.shape, dtype=torch.int8)
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        out[part] = _round_weight(weight[part], scales[part], WEIGHT_QMAX).to(torch.int8)
    return out


def fake_quantize_weight(weight: torch.Tensor, scales: torch.Tensor, qmax: int = WEIGHT_QMAX) -> torch.Tensor:
    """(out, in) float32: the int8 weight dequantized, what the QDQ graph's weight DequantizeLinear
    yields (with another `qmax`: the same rounding on a wider grid)."""
    return _round_weight(weight, scales, qmax) * scales.view(-1, 1)


def activation_scale(amax: float) -> torch.Tensor:
    """Scalar float32 scale for a per-tensor static range (1.0 if the input was always zero)."""
    return torch.tensor(amax / INT8_MAX if amax > 0 else 1.0, dtype=torch.float32)


def _static_int(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(QuantizeLinear(x) with zero point 0, as float32 integers; scale)."""
    return torch.clamp(torch.round(x / scale), INT8_MIN, INT8_MAX), scale


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear with zero point 0, as ONNX defines them."""
    q, scale = _static_int(x, scale)
    return q * scale


def _dynamic_per_tensor_int(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 values of ONNX DynamicQuantizeLinear minus its zero point, as float32 integers; scale):
    the range [min(0, x_min), max(0, x_max)] over the whole tensor, zero point rounded and saturated."""
    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    if float(scale) == 0.0:
        return torch.zeros_like(x), scale
    zero_point = torch.clamp(torch.round(-lo / scale), 0, 255)
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point, scale


def fake_quantize_dynamic_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """What MatMulInteger sees after ONNX DynamicQuantizeLinear, dequantized."""
    q, scale = _dynamic_per_tensor_int(x)
    return q * scale


def per_token_scales(x: torch.Tensor) -> torch.Tensor:
    """(..., 1) symmetric int8 scales, one per token (last axis reduced); all-zero tokens get a tiny
    positive scale, as the exported graph computes it."""
    return torch.clamp(x.abs().amax(dim=-1, keepdim=True), min=TINY_AMAX) / INT8_MAX


def _per_token_int(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(symmetric int8 values, one scale per token, as float32 integers; (..., 1) scales)."""
    scale = per_token_scales(x)
    return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX), scale


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with one scale per token, as the exported O1 graph computes it."""
    q, scale = _per_token_int(x)
    return q * scale


def act_mode(level: str) -> str:
    """The activation mode of a recipe level (O1/O2/O3)."""
    return {"O3": "static", "O2": "dynamic_per_tensor", "O1": "dynamic_per_token"}[level]


def quantize_input(x: torch.Tensor, mode: str, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear's input as the exported graph quantizes it: (the integers the int8 kernel multiplies,
    as float32 (zero point already subtracted); their scale: a scalar, or (..., 1) per token).
    `scale` is used by `static` only."""
    if mode == "static":
        return _static_int(x, scale)
    if mode == "dynamic_per_tensor":
        return _dynamic_per_tensor_int(x)
    if mode == "dynamic_per_token":
        return _per_token_int(x)
    raise ValueError(f"activation mode {mode!r} is not one of {ACT_MODES}")


def fake_quantize_input(x: torch.Tensor, mode: str, scale: torch.Tensor) -> torch.Tensor:
    """A linear's input quantized as the exported graph quantizes it, dequantized."""
    q, x_scale = quantize_input(x, mode, scale)
    return q * x_scale


@dataclass(frozen=True)
class LinearQuant:
    """Static quantization parameters of one linear."""

    name: str
    in_features: int
    out_features: int
    act_amax: float  # the static range: abs-max, or the clipped range when a clipping method is used
    act_scale: torch.Tensor  # () float32
    weight_scale: torch.Tensor  # (out,) float32
    weight_rel_error: float  # ||W - dequant(quant(W))|| / ||W||
    act_mode: str = "static"  # one of ACT_MODES; dynamic modes ignore act_scale

    def __post_init__(self) -> None:
        if self.act_mode not in ACT_MODES:
            raise ValueError(f"{self.name}: activation mode {self.act_mode!r} is not one of {ACT_MODES}")

    def summary(self) -> dict:
        return {
            "act_mode": self.act_mode,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "act_amax": self.act_amax,
            "act_scale": float(self.act_scale),
            "weight_scale_min": float(self.weight_scale.min()),
            "weight_scale_max": float(self.weight_scale.max()),
            "weight_rel_error": self.weight_rel_error,
        }


@dataclass(frozen=True)
class EmbeddingQuant:
    """The token embedding table in int8, one symmetric scale per row (the weights' own arithmetic:
    a row of the table is what an output channel is to a linear)."""

    name: str  # module name, e.g. model.embed_tokens
    weight_scale: torch.Tensor  # (vocab,) float32
    weight_rel_error: float  # ||E - dequant(quant(E))|| / ||E||

    def summary(self) -> dict:
        return {"name": self.name, "dtype": "int8", "granularity": "per_row",
                "rows": int(self.weight_scale.numel()), "weight_rel_error": self.weight_rel_error}


@dataclass
class QuantPlan:
    linears: dict[str, LinearQuant]  # in model order
    excluded: list[str]  # quantizable linears kept in float
    embedding: EmbeddingQuant | None = None  # None: the table stays float


def name_matches(name: str, pattern: str) -> bool:
    """A recipe's linear pattern: the exact module name or an fnmatch pattern."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def split_by_exclusions(names: list[str], exclude: list[str]) -> tuple[list[str], list[str]]:
    """(quantized, excluded): a name is excluded if it equals or fnmatches any pattern."""
    excluded = [n for n in names if any(name_matches(n, p) for p in exclude)]
    return [n for n in names if n not in excluded], excluded


def check_patterns(names: list[str], patterns: dict[str, list[str]], architecture: str) -> None:
    """Refuse a recipe pattern that names no linear of the model: a typo would otherwise leave a linear
    quantized that the recipe meant to keep in float (or on the default range method), silently.

    Args:
        names: the model's quantizable linears.
        patterns: recipe field -> the patterns it sets.
    """
    for field, values in patterns.items():
        for pattern in values:
            if not any(name_matches(n, pattern) for n in names):
                raise UserError(f"{field}: {pattern!r} matches none of the {len(names)} linears of {architecture} "
                                f"(they are named like {names[0]!r} ... {names[-1]!r})")


@torch.no_grad()
def plan_quantization(
    model: torch.nn.Module, names: list[str], act_ranges: dict[str, float], cfg: Quantization
) -> QuantPlan:
    """Compute the static scales of every quantized linear.

    Args:
        names: quantizable linears (model order); `cfg.exclude` removes some of them.
        act_ranges: static input range per quantized linear (abs-max or clipped), measured on the
            model as it will be exported (smoothed).
    """
    quantized, excluded = split_by_exclusions(names, cfg.exclude)
    linears = {}
    for name in quantized:
        lin = model.get_submodule(name)
        w_scale = weight_scales(lin.weight)
        w_deq = fake_quantize_weight(lin.weight, w_scale)
        rel_err = float((lin.weight - w_deq).norm() / lin.weight.norm().clamp(min=1e-12))
        amax = act_ranges[name]
        linears[name] = LinearQuant(
            act_mode=act_mode(cfg.activations.level),
            name=name,
            in_features=lin.in_features,
            out_features=lin.out_features,
            act_amax=amax,
            act_scale=activation_scale(amax),
            weight_scale=w_scale,
            weight_rel_error=rel_err,
        )
    embedding = plan_embedding(model) if cfg.embedding == "int8" else None
    return QuantPlan(linears=linears, excluded=excluded, embedding=embedding)


def embedding_module_name(model: torch.nn.Module) -> str:
    """The module name of the model's token embedding (`get_input_embeddings`)."""
    table = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is table:
            return name
    raise RuntimeError(f"{type(model).__name__}: its input embedding is not one of its modules")


@torch.no_grad()
def plan_embedding(model: torch.nn.Module) -> EmbeddingQuant:
    """Per-row int8 scales of the token embedding table."""
    table = model.get_input_embeddings().weight
    scales = weight_scales(table)
    deq = fake_quantize_weight(table, scales)
    rel_err = float((table - deq).norm() / table.norm().clamp(min=1e-12))
    return EmbeddingQuant(name=embedding_module_name(model), weight_scale=scales, weight_rel_error=rel_err)


class FakeQuantLinear(torch.nn.Module):
    """A linear that computes what the deployed int8 kernel computes, in float32.

    The integer products are summed as integers (float32 holds every partial sum exactly below
    2**24: int8 products reach that only with more than 1,032 inputs all near full scale), then
    scaled once, in the exported graph's order: ORT's MatMulIntegerToFloat multiplies the sum by
    s_x * s_w; the O1 graph by s_token, then s_w. Summing dequantized values instead rounds every
    partial sum: a last-bit difference that can flip a later activation's rounding.
    """

    def __init__(self, linear: torch.nn.Linear, quant: LinearQuant):
        super().__init__()
        self.weight = torch.nn.Parameter(_round_weight(linear.weight, quant.weight_scale, WEIGHT_QMAX),
                                         requires_grad=False)  # (out, in) int8 values as float32
        self.register_buffer("weight_scale", quant.weight_scale.clone().float())
        self.bias = linear.bias
        self.register_buffer("act_scale", quant.act_scale.clone())
        self.act_mode = quant.act_mode
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, x_scale = quantize_input(x, self.act_mode, self.act_scale)
        acc = F.linear(q, self.weight)  # integer sums
        y = acc * x_scale * self.weight_scale if x_scale.dim() else acc * (x_scale * self.weight_scale)
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def apply_fake_quant(model: torch.nn.Module, plan: QuantPlan) -> torch.nn.Module:
    """Swap every planned linear for a `FakeQuantLinear`, and an int8 embedding table for its
    dequantized values, in place; returns the model.

    The table gets a new parameter: a float lm_head tied to it keeps reading the float table, as the
    exported graph's lm_head does (only the Gather reads the int8 copy)."""
    for name, quant in plan.linears.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, FakeQuantLinear(getattr(parent, attr), quant))
    if plan.embedding is not None:
        table = model.get_submodule(plan.embedding.name)
        # q * s in float32: what Cast(int8) -> Mul(row scale) computes in the graph, bit for bit
        table.weight = torch.nn.Parameter(fake_quantize_weight(table.weight, plan.embedding.weight_scale),
                                          requires_grad=False)
    return model
