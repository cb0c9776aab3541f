"""`export.attention: onnxruntime`: each layer's attention as ONNX Runtime's GroupQueryAttention.

The standard-ONNX KV graph spends about 40 small nodes per layer on attention: reshapes and
transposes into heads, rotary (Slice, Neg, Concat, two Mul, Add for each of q and k), the cache
Concat, two batched MatMuls, the mask Add and the Softmax. At batch 1 each runs on a few hundred
floats, so the INT8 decode step, whose int8 matmuls are fast, spends a large share of its time there
(SmolLM2-135M: see the README's decode benchmark). ONNX Runtime's `com.microsoft.GroupQueryAttention`
does all of it in one kernel: rotary from cos/sin tables, the cache append, grouped heads, causal
softmax, plus the graph's own additive mask as `attention_bias`, so `attention_mask` (padding)
means what it meant before. A per-head q/k RMSNorm (Qwen3) stays in the graph before the kernel:
ONNX Runtime's CPU kernel refuses its q/k norm inputs. A layer without rotary (SmolLM3's NoPE
layers; OPT and GPT-2, whose learned positions are added before the blocks) runs the kernel with
`do_rotary` 0. A rotary over the first R dimensions of each head (Phi) gives the kernel tables R / 2
wide. Gemma 2's logit soft-capping, cap * tanh(scores / cap) before the mask, is the kernel's
`softcap`. Gemma 3's layer types rotate with their own tables, one pair per type, and its q/k norms
act on (B, heads, S, D): they stay in the graph and a Transpose takes them back to (B, S, heads, D).
A cache repeated per query head (HF's `repeat_kv`) is read through the repetition. A
sliding-window layer (Mistral, Gemma 2 and 3) keeps its whole cache in the kernel's present,
where the standard graph keeps the last window - 1 tokens: the graph's own sliding-window mask,
computed from the true past length, does the windowing as `attention_bias`, so the logits are the
same and the cache grows as a full layer's does.

The rewrite matches the graph this converter exports, layer by layer, from the `present.{i}.*`
outputs back to the projections and forward to the attention output, and replaces it only when
every layer matches; otherwise it is a one-line error naming the layer and what differed. The
result runs only in ONNX Runtime (the recipe allows it only with ONNX Runtime targets). Limits that
the standard graph does not have, both from the kernel: a multi-token step after a non-empty past
(chunked prefill) needs batch 1, and rotary positions end at the model's `max_position_embeddings`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from converter.errors import UserError
from converter.export import kv_graph

MS_DOMAIN = "com.microsoft"
# rotary variants whose cos/sin for a position do not depend on the sequence length: one table serves
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


@dataclass
class _Layer:
    q: ir.Value  # (B, S, H, D): the projections split into heads (and normed per head, if the model does)
    k: ir.Value
    v: ir.Value
    bias: ir.Value | None  # additive mask (B, 1, S, T)
    scale: float
    softcap: float  # 0 without soft-capping
    rotary: bool  # False for a NoPE layer
    out: ir.Value  # (B, S, H * D) attention output, before o_proj
    present: tuple[ir.Value, ir.Value]
    reshapes: tuple[ir.Node, ir.Node, ir.Node]  # q, k, v: (B, S, heads * D) -> (B, S, heads, D)
    heads_first: tuple[bool, bool, bool]  # q, k, v given as (B, heads, S, D): normed after the Transpose


class _NoMatch(Exception):
    pass


def _producer(value: ir.Value | None, *ops: str) -> ir.Node:
    node = value.producer() if value is not None else None
    if node is None or node.op_type not in ops or node.domain not in ("", "ai.onnx"):
        found = "a graph input or initializer" if node is None else node.op_type
        raise _NoMatch(f"expected {' or '.join(ops)} producing {value.name if value else None}, found {found}")
    return node


def _only_use(value: ir.Value, *ops: str) -> ir.Node:
    uses = [u.node for u in value.uses()]
    if len(uses) != 1 or uses[0].op_type not in ops:
        raise _NoMatch(f"expected {value.name} to feed one {' or '.join(ops)}, found {[u.op_type for u in uses]}")
    return uses[0]


def _perm(node: ir.Node) -> list[int]:
    return list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else []


def _scalar(value: ir.Value) -> float:
    node = value.producer()
    tensor = value.const_value if value.const_value is not None else (
        node.attributes["value"].as_tensor() if node is not None and node.op_type == "Constant" else None)
    if tensor is None or tensor.numpy().size != 1:
        raise _NoMatch(f"{value.name}: expected a constant scalar")
    return float(tensor.numpy().reshape(()))


def _heads(value: ir.Value) -> tuple[ir.Value, ir.Node, str | None]:
    """`value` = Transpose(perm 0,2,1,3)(x), x = Reshape(projection) (B, S, heads, D), or a per-head
    RMSNorm of x (Qwen3's q_norm / k_norm) or of the Transpose (Gemma 3's): returns (x, the Reshape,
    where the norm sits: None, "before" the Transpose with x (B, S, heads, D), or "after" it with
    x = `value`, (B, heads, S, D)).

    The norm stays in the graph: ONNX Runtime's CPU GroupQueryAttention refuses its q/k norm inputs.
    """
    producer = value.producer()
    if producer is not None and producer.op_type == "Mul" and producer.domain in ("", "ai.onnx"):
        transpose = _producer(_rms_norm_input(producer), "Transpose")
        if _perm(transpose) != [0, 2, 1, 3]:
            raise _NoMatch(f"{transpose.name}: perm {_perm(transpose)}")
        return value, _producer(transpose.inputs[0], "Reshape"), "after"
    transpose = _producer(value, "Transpose")
    if _perm(transpose) != [0, 2, 1, 3]:
        raise _NoMatch(f"{transpose.name}: perm {_perm(transpose)}")
    heads = transpose.inputs[0]
    producer = heads.producer()
    if producer is not None and producer.op_type == "Reshape":
        return heads, producer, None
    return heads, _producer(_rms_norm_input(_producer(heads, "Mul")), "Reshape"), "before"


def _rms_norm_input(mul: ir.Node) -> ir.Value:
    """y of weight * (y / Sqrt(ReduceMean(y^2) + eps)) (the RMSNorm after `_rsqrt_as_div`), from its Mul."""
    div = next((v.producer() for v in mul.inputs if v.producer() is not None and v.producer().op_type == "Div"), None)
    if div is None:
        raise _NoMatch(f"{mul.name}: neither the head Reshape nor an RMSNorm")
    mean = _producer(_producer(_producer(div.inputs[1], "Sqrt").inputs[0], "Add").inputs[0], "ReduceMean")
    if _producer(mean.inputs[0], "Pow").inputs[0] is not div.inputs[0]:
        raise _NoMatch(f"{mul.name}: not an RMSNorm of its own input")
    return div.inputs[0]


def _rotary(value: ir.Value) -> tuple[ir.Value, ir.Value | None, ir.Value | None]:
    """`value` = x * cos + rotate_half(x) * sin, rotate_half(x) = Concat(-x[..., D/2:], x[..., :D/2]):
    returns (x, cos, sin); (value, None, None) for a layer without rotary (SmolLM3's NoPE layers),
    where the heads Transpose feeds the cache directly."""
    if value.producer() is not None and value.producer().op_type == "Transpose":
        return value, None, None
    if value.producer() is not None and value.producer().op_type == "Concat":
        return _partial_rotary(value.producer())
    add = _producer(value, "Add")
    muls = [_producer(v, "Mul") for v in add.inputs]
    for plain, rotated in (muls, muls[::-1]):
        for j in (0, 1):
            half = rotated.inputs[j].producer()
            if half is None or half.op_type != "Concat" or len(half.inputs) != 2:
                continue
            neg = _producer(half.inputs[0], "Neg")
            upper, lower = _producer(neg.inputs[0], "Slice"), _producer(half.inputs[1], "Slice")
            x = upper.inputs[0]
            if lower.inputs[0] is not x or x not in plain.inputs:
                raise _NoMatch(f"{half.name}: rotate_half of a different tensor")
            return x, plain.inputs[1 - list(plain.inputs).index(x)], rotated.inputs[1 - j]
    raise _NoMatch(f"{add.name}: not a rotary embedding")


def _partial_rotary(concat: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Concat(rotary(x[..., :R]), x[..., R:]) (Phi: rotary over the first R of each head's
    dimensions): returns (x, cos, sin) as `_rotary` does."""
    axis = concat.attributes["axis"].as_int() if "axis" in concat.attributes else None
    if len(concat.inputs) != 2 or axis not in (-1, 3):
        raise _NoMatch(f"{concat.name}: not a partial rotary")
    part, cos, sin = _rotary(concat.inputs[0])
    rest = _producer(concat.inputs[1], "Slice")
    if cos is None or _producer(part, "Slice").inputs[0] is not rest.inputs[0]:
        raise _NoMatch(f"{concat.name}: not the rotary and the rest of one tensor")
    return rest.inputs[0], cos, sin


def _cache_concat(present: ir.Value) -> ir.Node:
    """The Concat(past, new) behind a present output: its producer, or, for a sliding-window layer
    whose present keeps the last window - 1 tokens, the Concat that Slice cuts."""
    node = _producer(present, "Concat", "Slice")
    while node.op_type == "Slice":  # the exporter may slice axis by axis
        node = _producer(node.inputs[0], "Concat", "Slice")
    return node


def _attended(full: ir.Value) -> list[ir.Value]:
    """The cache as the scores read it: `full` (past and new tokens) and, where the graph repeats it
    per query head (HF's `repeat_kv`: Unsqueeze, Expand, Reshape, as Gemma 3 exports), the repeated
    tensor. The kernel reads each KV head for its group of query heads, which is the same."""
    found = [full]
    for use in full.uses():
        node, expanded = use.node, False
        while (node.op_type in ("Slice", "Unsqueeze", "Expand", "Identity") and node.domain in ("", "ai.onnx")
               and len(node.outputs[0].uses()) == 1):
            expanded |= node.op_type == "Expand"
            node = next(iter(node.outputs[0].uses())).node
        if expanded and node.op_type == "Reshape":
            found.append(node.outputs[0])
    return found


def _match_layer(i: int, outputs: dict[str, ir.Value], inputs: dict[str, ir.Value]) -> _Layer:
    present_k, present_v = (outputs[n] for n in kv_graph.present_names(i + 1)[-2:])
    past_k, past_v = (inputs[n] for n in kv_graph.past_names(i + 1)[-2:])
    cat_k, cat_v = _cache_concat(present_k), _cache_concat(present_v)
    if list(cat_k.inputs)[:1] != [past_k] or list(cat_v.inputs)[:1] != [past_v]:
        raise _NoMatch("the cache Concat does not start with the past tensor")
    full_k, full_v = cat_k.outputs[0], cat_v.outputs[0]  # what attention reads: past and new tokens
    k_heads, cos, sin = _rotary(cat_k.inputs[1])
    k, k_reshape, k_norm = _heads(k_heads)
    v, v_reshape, v_norm = _heads(cat_v.inputs[1])
    if v_norm:
        raise _NoMatch("a norm on the values")
    key_t = [u.node for x in _attended(full_k) for u in x.uses() if u.node.op_type == "Transpose"]
    if len(key_t) != 1 or _perm(key_t[0]) != [0, 1, 3, 2]:
        raise _NoMatch(f"present.{i}.key: expected one Transpose(perm 0,1,3,2)")
    scores = _only_use(key_t[0].outputs[0], "MatMul")
    rows = scores.inputs[0]
    q_rot = _producer(rows, "Reshape").inputs[0] if rows.producer() and rows.producer().op_type == "Reshape" else rows
    q_heads, q_cos, q_sin = _rotary(q_rot)
    if (q_cos, q_sin) != (cos, sin):
        raise _NoMatch("query and key rotate with different tables")
    q, q_reshape, q_norm = _heads(q_heads)
    scaled = _only_use(scores.outputs[0], "Mul")
    scale = _scalar(scaled.inputs[1] if scaled.inputs[0] is scores.outputs[0] else scaled.inputs[0])
    logits, softcap = _softcap(scaled.outputs[0])
    node, bias, prev = _only_use(logits, "Reshape", "Add", "Softmax"), None, logits
    if node.op_type == "Reshape":  # grouped scores (B, H_kv, G*S, T) viewed as (B, H_kv, G, S, T) for the mask
        node, prev = _only_use(node.outputs[0], "Add"), node.outputs[0]
    if node.op_type == "Add":
        mask = node.inputs[1] if node.inputs[0] is prev else node.inputs[0]
        unsqueeze = mask.producer()  # the grouped form broadcasts (B, 1, S, T) over G as (B, 1, 1, S, T)
        bias = unsqueeze.inputs[0] if prev is not logits and unsqueeze is not None \
            and unsqueeze.op_type == "Unsqueeze" else mask
        node = _only_use(node.outputs[0], "Reshape", "Softmax")
        if node.op_type == "Reshape":
            node = _only_use(node.outputs[0], "Softmax")
    softmax = node
    axis = softmax.attributes["axis"].as_int() if "axis" in softmax.attributes else -1
    if axis not in (-1, 3):
        raise _NoMatch(f"{softmax.name}: softmax over axis {axis}")
    node = _only_use(softmax.outputs[0], "Cast", "MatMul")
    if node.op_type == "Cast":
        node = _only_use(node.outputs[0], "MatMul")
    if not any(node.inputs[1] is x for x in _attended(full_v)):
        raise _NoMatch(f"{node.name}: the probabilities do not multiply present.{i}.value")
    node = _only_use(node.outputs[0], "Reshape", "Transpose")
    if node.op_type == "Reshape":
        node = _only_use(node.outputs[0], "Transpose")
    if _perm(node) != [0, 2, 1, 3]:
        raise _NoMatch(f"{node.name}: perm {_perm(node)}")
    out = _only_use(node.outputs[0], "Reshape").outputs[0]
    return _Layer(q, k, v, bias, scale, softcap, cos is not None, out, (present_k, present_v),
                  (q_reshape, k_reshape, v_reshape), (q_norm == "after", k_norm == "after", False))


def _softcap(scores: ir.Value) -> tuple[ir.Value, float]:
    """Gemma 2's logit soft-capping, cap * tanh(scores / cap), after the scale: (its output, cap),
    or (scores, 0.0) without it (the kernel's `softcap` 0 is off)."""
    uses = [u.node for u in scores.uses()]
    if len(uses) != 1 or uses[0].op_type != "Div":
        return scores, 0.0
    div = uses[0]
    tanh = _only_use(div.outputs[0], "Tanh")
    mul = _only_use(tanh.outputs[0], "Mul")
    cap, back = _scalar(div.inputs[1]), _scalar(mul.inputs[1] if mul.inputs[0] is tanh.outputs[0] else mul.inputs[0])
    if cap != back or cap <= 0:
        raise _NoMatch(f"{div.name}: soft-capping divides by {cap} and multiplies by {back}")
    return mul.outputs[0], cap


def rotary_tables(model: torch.nn.Module) -> dict[str | None, tuple[np.ndarray, np.ndarray]]:
    """The model's own rotary cos/sin, (max_position_embeddings, rotary width / 2) each, as GQA reads
    them: {None: tables}, or one entry per layer type for a rotary with a table per type (Gemma 3's
    sliding and full attention layers rotate with different bases).

    Raises:
        UserError: no single rotary module, a rotary whose tables change with the sequence length,
            or a rotary width the kernel refuses (not a multiple of 16).
    """
    found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(found) != 1:
        raise UserError(f"export.attention onnxruntime needs one rotary embedding module; "
                        f"{type(model).__name__} has {len(found)}")
    rotary, config = found[0], model.config
    rope_type = getattr(rotary, "rope_type", "default")
    kinds = rope_type if isinstance(rope_type, dict) else {None: rope_type}
    for kind in kinds.values():
        if kind not in STATIC_ROPE:
            raise UserError(f"export.attention onnxruntime: rotary type {kind!r} changes with the sequence "
                            f"length; supported: {', '.join(STATIC_ROPE)}")
    positions = torch.arange(config.max_position_embeddings, dtype=torch.int64)[None]
    dim = kv_graph.model_kv_layout(config).head_dim
    tables = {}
    for layer_type in kinds:
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions,
                              **({} if layer_type is None else {"layer_type": layer_type}))
        rotary_dim = cos.shape[-1]  # less than head_dim for a partial rotary (GPT-NeoX, Phi)
        if rotary_dim > dim or rotary_dim % 16:  # the kernel: cos_cache width <= head_size / 2, a multiple of 8
            raise UserError(f"export.attention onnxruntime: rotary over {rotary_dim} of {dim} head dimensions; ONNX "
                            "Runtime's GroupQueryAttention needs a multiple of 16; use export.attention: onnx")
        half = rotary_dim // 2
        tables[layer_type] = (cos[0, :, :half].float().numpy().copy(), sin[0, :, :half].float().numpy().copy())
    return tables


def check_fusable(model: torch.nn.Module) -> None:
    """Before any calibration: refuse what the rewrite is known to refuse later, from the model alone.

    Raises:
        UserError: a rotary the kernel cannot take (see `rotary_tables`).
    """
    if any(type(m).__name__.endswith("RotaryEmbedding") for m in model.modules()):
        rotary_tables(model)


def _value(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                    const_value=ir.tensor(array, name=name))


def _op(graph: ir.Graph, before: ir.Node, op: str, inputs: list, name: str, n_out: int = 1, **attrs) -> ir.Node:
    node = ir.Node("", op, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
                   name=name, num_outputs=n_out)
    for j, out in enumerate(node.outputs):
        out.name = f"{name}/out{j}" if n_out > 1 else f"{name}/out"
    graph.insert_before(before, [node])
    return node


def fuse_attention(onnx_model: ir.Model, model: torch.nn.Module) -> int:
    """Replace every layer's attention with GroupQueryAttention; returns the number of layers.

    Raises:
        UserError: the model is not a KV-cache decoder, or a layer's attention is not the pattern
            this rewrite knows (the message names the layer and what differed).
    """
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph = onnx_model.graph
    inputs, outputs = {v.name: v for v in graph.inputs}, {v.name: v for v in graph.outputs}
    matched = _match_layers(model, inputs, outputs)
    shared = _shared_inputs(graph, model, matched, inputs["attention_mask"])
    for i, m in enumerate(matched):
        _fuse_layer(graph, model, i, m, inputs, shared)
    RemoveUnusedNodesPass()(onnx_model)
    onnx_model.opset_imports.setdefault(MS_DOMAIN, 1)
    return len(matched)


def _match_layers(model: torch.nn.Module, inputs: dict, outputs: dict) -> list:
    """Every layer's attention matched to the pattern, or a UserError naming the first that is not."""
    if kv_graph.past_names(1)[0] not in inputs:
        raise UserError(f"export.attention onnxruntime fuses a KV-cache decoder's attention; the "
                        f"{type(model).__name__} graph has no past_key_values inputs (an encoder, or "
                        "export.kv_cache: false)")
    matched = []
    for i in range(model.config.num_hidden_layers):
        try:
            matched.append(_match_layer(i, outputs, inputs))
        except _NoMatch as err:
            raise UserError(f"export.attention onnxruntime: layer {i} of {type(model).__name__} is not attention "
                            f"this rewrite knows ({err}); use export.attention: onnx") from None
    return matched


@dataclass
class _Shared:
    """The values every layer's GroupQueryAttention reads, made once before the first block."""

    seqlens: ir.Value  # (B,) int32: T - 1 for every row (the mask does the padding)
    total: ir.Value  # () int32: the mask's width T
    merge: ir.Value  # (B, S, heads, D) -> (B, S, heads * D) reshape
    tables: dict  # layer type (None: one for all) -> (cos_cache, sin_cache)


def _shared_inputs(graph, model: torch.nn.Module, matched: list, mask: ir.Value) -> _Shared:
    order = {id(n): j for j, n in enumerate(graph)}  # the shared inputs go before the first block's reshapes
    first = min((r for m in matched for r in m.reshapes), key=lambda n: order[id(n)])
    # total length T = attention_mask's width; seqlens_k = T - 1 for every row (the mask does the padding)
    width = _op(graph, first, "Shape", [mask], "gqa/total_length_i64", start=1, end=2).outputs[0]
    width32 = _op(graph, first, "Cast", [width], "gqa/total_length_i32", to=ir.DataType.INT32).outputs[0]
    total = _op(graph, first, "Squeeze", [width32], "gqa/total_sequence_length").outputs[0]
    batch = _op(graph, first, "Shape", [mask], "gqa/batch", start=0, end=1).outputs[0]
    one = _value("gqa/one", np.array(1, np.int32))
    last = _op(graph, first, "Sub", [total, one], "gqa/last_position").outputs[0]
    seqlens = _op(graph, first, "Expand", [last, batch], "gqa/seqlens_k").outputs[0]
    merge = _value("gqa/merge_heads", np.array([0, 0, -1], np.int64))  # (B, S, heads, D) -> (B, S, heads * D)
    tables = {kind: [_value(f"gqa/{name}{'' if kind is None else '.' + kind}", table)
                     for name, table in zip(("cos_cache", "sin_cache"), pair)]
              for kind, pair in (rotary_tables(model).items() if any(m.rotary for m in matched) else ())}
    for value in (one, merge, *(v for pair in tables.values() for v in pair)):
        graph.register_initializer(value)
    return _Shared(seqlens, total, merge, tables)


def _fuse_layer(graph, model: torch.nn.Module, i: int, m, inputs: dict, shared: _Shared) -> None:
    """Insert layer `i`'s GroupQueryAttention and move its attention output and presents onto it."""
    from converter.models.archs import head_layout

    heads = head_layout(model.config)
    before = m.out.producer()
    # GQA takes (B, S, heads * D): the projection itself, or the per-head norm's output merged back
    flat = []
    for role, x, reshape, heads_first in zip(("query", "key", "value"), (m.q, m.k, m.v), m.reshapes, m.heads_first):
        name = f"model.layers.{i}.self_attn/{role}"
        if heads_first:
            x = _op(graph, before, "Transpose", [x], f"{name}_heads_last", perm=[0, 2, 1, 3]).outputs[0]
        flat.append(reshape.inputs[0] if x is reshape.outputs[0] else
                    _op(graph, before, "Reshape", [x, shared.merge], f"{name}_merged").outputs[0])
    tables = shared.tables
    rotary = ((None, None) if not m.rotary else
              tables[None] if None in tables else tables[model.config.layer_types[i]])
    gqa = ir.Node(MS_DOMAIN, "GroupQueryAttention",
                  [*flat, *(inputs[n] for n in kv_graph.past_names(i + 1)[-2:]), shared.seqlens, shared.total,
                   *rotary, None, m.bias],
                  attributes=[ir.AttrInt64("num_heads", heads.num_heads),
                              ir.AttrInt64("kv_num_heads", heads.num_kv_heads),
                              ir.AttrInt64("do_rotary", int(m.rotary)), ir.AttrFloat32("scale", m.scale),
                              *([ir.AttrFloat32("softcap", m.softcap)] if m.softcap else [])],
                  name=f"model.layers.{i}.self_attn/GroupQueryAttention", num_outputs=3)
    graph.insert_before(before, [gqa])
    out, present_k, present_v = gqa.outputs
    ir.convenience.replace_all_uses_with(m.out, out)
    for old, new in zip(m.present, (present_k, present_v)):
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    out.name, (out.type, out.shape) = f"{m.out.name}.gqa", (m.out.type, m.out.shape)
    for old, new in zip(m.present, (present_k, present_v)):
        name, old.name = old.name, f"{old.name}.replaced"
        new.name, new.type, new.shape = name, old.type, old.shape
