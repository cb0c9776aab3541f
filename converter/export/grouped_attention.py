"""Grouped-query attention for export: the query heads of one KV head attend as rows of one matmul.

HF's eager attention repeats every key/value head `num_key_value_groups` times (`repeat_kv`) before
its two batched matmuls. In the ONNX graph that is an Expand + Reshape per tensor and layer, which
copies the whole cache on every decode step: the copy grows with the context and costs the INT8
graph, whose matmuls read a quarter of FP32's bytes, the larger share of its step (SmolLM2, 9 query
heads on 3 KV heads: see the README's decode benchmark). Laying the G query heads of a KV head
side by side as G * S rows gives the same dot products without the copy:

    query (B, H, S, D) -> (B, H_kv, G*S, D) @ key^T (B, H_kv, D, T) -> scores (B, H_kv, G*S, T)

The export uses it (`for_export`); calibration and the PyTorch reference keep HF's eager attention.
Anything this function does not reproduce (attention sinks, a mask per head) goes to the model's own
eager attention instead, so a model only ever gets the grouped form where it is the same arithmetic.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch import nn

GROUPED = "grouped_eager"
# keyword arguments some models pass that change the arithmetic in ways the grouped form does not follow
_DELEGATED_KWARGS = ("s_aux", "sinks")


def grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      softcap: float | None = None, **kwargs):
    """HF's eager attention (with Gemma 2's optional soft-capping), without repeating K/V heads.

    Args:
        query: (B, H, S, D), rotary applied. key, value: (B, H_kv, T, D), the cache included.
        attention_mask: additive float mask (B, 1, S, T), or None.

    Returns:
        (attention output (B, S, H, D), attention probabilities (B, H, S, T)), as HF's eager returns.
    """
    batch, heads, seq, dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if (groups == 1 or (attention_mask is not None and attention_mask.shape[1] != 1)
            or any(kwargs.get(k) is not None for k in _DELEGATED_KWARGS)):
        return _model_eager(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    softcap=softcap, **kwargs)
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    rows = query.reshape(batch, kv_heads, groups * seq, dim)  # head h = kv * G + g: a KV head's queries adjacent
    scores = torch.matmul(rows, key.transpose(2, 3)) * scaling  # (B, H_kv, G*S, T)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:  # (B, 1, S, T) broadcast over the G query heads of every KV head
        scores = (scores.view(batch, kv_heads, groups, seq, total) + attention_mask[:, :, None]).view(
            batch, kv_heads, groups * seq, total)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value)  # (B, H_kv, G*S, D)
    return out.view(batch, heads, seq, dim).transpose(1, 2).contiguous(), probs.view(batch, heads, seq, total)


def _model_eager(module: nn.Module):
    """The eager attention function of the module's own modeling file (each family has its own)."""
    found = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if found is None:
        raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
    return found


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED, grouped_attention)
    AttentionMaskInterface.register(GROUPED, eager_mask)  # the same additive float mask eager gets


def groups_kv_heads(model: nn.Module) -> bool:
    """Whether some attention block of `model` shares a KV head between query heads (GQA / MQA)."""
    return any(getattr(m, "num_key_value_groups", 1) > 1 for m in model.modules())


@contextmanager
def for_export(model: nn.Module, enabled: bool = True):
    """Run `model` with grouped attention inside the block, when `enabled` (the architecture table's
    `grouped_attention`) and the model has eager attention and GQA heads."""
    before = model.config._attn_implementation
    if not enabled or before != "eager" or not groups_kv_heads(model) or not model._can_set_attn_implementation():
        yield model
        return
    _register()
    model.set_attn_implementation(GROUPED)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
