"""KV-cache decoder graphs: one ONNX graph for prefill (empty past) and one-token decode steps.

Inputs  `input_ids` (B, T), `attention_mask` (B, P + T), `past_key_values.{i}.key/value` (B, H_kv, P, D)
Outputs `logits` (B, T, V), `present.{i}.key/value` (B, H_kv, P + T, D); a sliding-window block's
        present keeps its last window - 1 of those (the fused-attention graph keeps them all)
B, T and P are dynamic; prefill feeds P = 0 (zero-length past tensors). The wrapper rebuilds an HF
`DynamicCache` from the flat past tensors inside forward, so any decoder that takes the generic
cache API exports the same way (no per-architecture code here).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PAST_PREFIX = "past_key_values"
PRESENT_PREFIX = "present"
BASE_INPUTS = ("input_ids", "attention_mask")


def graph_signature(model_path: Path) -> tuple[tuple, tuple]:
    """(inputs, outputs) `onnx.ValueInfoProto`s of a graph, initializers excluded, without its weights.

    Read once per version of the file (path, inode, mtime, size): the pipeline, the targets and
    Triton all ask for the same graph's signature, and an inline model's weights are most of its bytes.
    """
    stat = Path(model_path).stat()
    return _read_signature(str(model_path), stat.st_ino, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_signature(path: str, inode: int, mtime_ns: int, size: int) -> tuple[tuple, tuple]:
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}

    def detached(value):  # a copy: a sub-message would keep the whole loaded model alive
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(value)
        return copy

    return (tuple(detached(v) for v in graph.input if v.name not in initializers),
            tuple(detached(v) for v in graph.output))


def past_names(num_layers: int) -> list[str]:
    return [f"{PAST_PREFIX}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"{PRESENT_PREFIX}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of the KV-cache graph of a decoder with `num_layers` blocks."""
    return [*BASE_INPUTS, *past_names(num_layers)], ["logits", *present_names(num_layers)]


@dataclass(frozen=True)
class KvLayout:
    """Shape of one layer's key/value cache tensor: (batch, kv_heads, past, head_dim)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype = np.dtype(np.float32)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length past tensors for a prefill."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, dtype=self.dtype) for name in past_names(self.num_layers)}


def model_kv_layout(config) -> KvLayout:
    from converter.models.archs import head_layout

    heads = head_layout(config)
    return KvLayout(config.num_hidden_layers, heads.num_kv_heads, heads.head_dim)


def graph_kv_layout(model_path: Path) -> KvLayout | None:
    """The KV layout a graph's `past_key_values.*` inputs declare, or None for a graph without a cache."""
    from onnx.helper import tensor_dtype_to_np_dtype

    past = [v for v in graph_signature(model_path)[0] if v.name.startswith(f"{PAST_PREFIX}.")]
    if not past:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in past[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] is None or dims[3] is None:
        raise RuntimeError(f"{model_path.name}: {past[0].name} has dims {dims}, expected (batch, heads, past, head_dim)")
    dtype = np.dtype(tensor_dtype_to_np_dtype(past[0].type.tensor_type.elem_type))
    return KvLayout(len(past) // 2, dims[1], dims[3], dtype)


def prefill_feed(ids: np.ndarray, mask: np.ndarray, layout: KvLayout | None) -> dict[str, np.ndarray]:
    """The feed of a full-sequence run: ids and mask, plus empty past tensors for a KV graph."""
    feed = {"input_ids": ids, "attention_mask": mask}
    return feed if layout is None else {**feed, **layout.empty_past(ids.shape[0])}


class KvWrapper(torch.nn.Module):
    """Exports logits and the updated cache from (input_ids, attention_mask, *flat past tensors)."""

    def __init__(self, model: torch.nn.Module, wrapped_attr: str):
        super().__init__()
        setattr(self, wrapped_attr, model)
        self._attr = wrapped_attr

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        model = getattr(self, self._attr)
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(ddp_cache_data=pairs, config=model.config)
        # A sliding-window layer keeps only its last window - 1 tokens, so the cache rebuilt from them
        # would count that many as seen: positions and the window mask would drift once past the
        # window. The mask says how many tokens came before this call. The layer also holds the past
        # as fed, not cut to the window again, so a graph whose past keeps every token (fused
        # attention) gets a mask as wide as that past.
        seen = attention_mask.shape[1] - input_ids.shape[1]
        for layer, (keys, values) in zip(cache.layers, pairs):
            if getattr(layer, "is_sliding", False):
                layer.keys, layer.values, layer.cumulative_length = keys, values, seen
                layer.get_mask_sizes = types.MethodType(_window_mask_sizes, layer)
        out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def _window_mask_sizes(layer, query_length: int) -> tuple[int, int]:
    """(kv_length, kv_offset) of a sliding-window layer's mask: the kept past plus the new tokens,
    starting where the kept past starts. HF's own version branches on the past length, which the
    exporter would fix to the example's branch; this one is the same value on both branches."""
    kept = layer.keys.shape[-2]
    return kept + query_length, layer.cumulative_length - kept


def example_inputs(config, layout: KvLayout) -> tuple[torch.Tensor, ...]:
    """Example tensors whose batch, sequence and past sizes differ from each other and from every
    static size (heads, head_dim), so the exporter cannot confuse a dynamic axis with a fixed one."""
    taken = {layout.kv_heads, layout.head_dim}
    batch, seq, past = (next(n for n in range(start, start + 64) if n not in taken) for start in (2, 5, 7))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    kv = [torch.randn(batch, layout.kv_heads, past, layout.head_dim, generator=gen)
          for _ in range(2 * layout.num_layers)]
    return (ids, mask, *kv)


def dynamic_shapes(layout: KvLayout, batch: bool, sequence: bool) -> tuple:
    """Dim.AUTO on the dynamic axes: the exporter works out that the mask is past + sequence long."""
    auto, static = torch.export.Dim.AUTO, torch.export.Dim.STATIC
    b = auto if batch else static
    s = auto if sequence else static
    past = {0: b, 1: static, 2: auto, 3: static}
    return ({0: b, 1: s}, {0: b, 1: auto}, tuple(dict(past) for _ in range(2 * layout.num_layers)))


def graph_io_names(model_path: Path) -> tuple[list[str], list[str]]:
    """(inputs, outputs) names of an ONNX graph, initializers excluded: what the manifest records."""
    inputs, outputs = graph_signature(model_path)
    return [v.name for v in inputs], [v.name for v in outputs]
