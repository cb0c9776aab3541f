"""Stage *export*: FP32 ONNX from PyTorch, then QuantizeLinear/DequantizeLinear by graph surgery.

The FP32 export keeps parameter names (`dynamo=True, optimize=False`), so each linear appears as
`MatMul(x, Transpose(<linear>.weight))`. Surgery then gives every quantized MatMul:
  x -> QuantizeLinear(s_x, 0) -> DequantizeLinear(s_x, 0) -> MatMul input A
  int8 W^T (in, out) -> DequantizeLinear(s_w per output channel, axis=1, 0) -> MatMul input B
with its own scale and zero-point initializers, so ONNX Runtime fuses each into an int8 kernel and
TensorRT sees explicit, symmetric quantization. Linears that read the same tensor with the same
static scale (q/k/v, gate/up) become one such MatMul over their concatenated weights, then a Split
(names: converter/export/qdq_names.py): the same arithmetic, fewer and larger int8 kernels.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
import torch

from converter.errors import UserError
from converter.export import kv_graph
from converter.export.grouped_attention import for_export
from converter.export.qdq_names import EMBEDDING_SCALE_SUFFIX, EMBEDDING_SUFFIX, WEIGHT_DQ_SUFFIX, WEIGHT_SUFFIX, matmul_name
from converter.models.archs import ArchSpec, arch_spec
from converter.models.io import ModelIO, OutputOf, model_io
from converter.progress import note, track
from converter.quant.quantize import INT8_MAX, TINY_AMAX, EmbeddingQuant, QuantPlan, quantize_weight

if TYPE_CHECKING:  # annotations only: the recipe sits above the stages
    from converter.recipe import Export

WRAPPED = "model"  # attribute name of the HF model inside the export wrapper (prefixes initializers)
_TWO_GB = 2 * 1024**3
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class QdqResult:
    path: Path
    quantized_matmuls: int
    external_data: bool
    size_bytes: int


def export_fp32(model: torch.nn.Module, path: Path, cfg: Export, spec: ArchSpec | None = None) -> Path:
    """Export the float model to ONNX with dynamic batch/sequence axes as the recipe asks.

    The graph's inputs and output follow the model kind (`converter.models.io.model_io`): a decoder
    exports `logits`, and with `cfg.kv_cache` also takes and returns the key/value cache
    (converter/export/kv_graph.py); an encoder exports its table entry's output.
    """
    save_program(export_program(model, cfg, spec), path, cfg)
    return path


def save_program(program: torch.onnx.ONNXProgram, path: Path, cfg: Export) -> None:
    """Write an exported program as `torch.onnx.export(..., path)` does, then check its opset."""
    # An intermediate file, so always external: serializing a 550 MB model inline costs the
    # exporter ~3 GB of RSS (measured on SmolLM2-135M: 4.1 GB peak inline, 1.2 GB external).
    program.save(str(path), external_data=True)
    _check_opset(path, cfg)


def export_program(model: torch.nn.Module, cfg: Export, spec: ArchSpec | None = None) -> torch.onnx.ONNXProgram:
    """The exported program of `export_fp32`, not yet written. Weights stay what they are in the
    module: a module whose parameters are meta tensors (a block-streamed skeleton) exports its graph,
    and its initializers get their values before the program is saved (converter/export/streamed.py)."""
    spec = spec or arch_spec(model)
    io: ModelIO = model_io(spec, model.config)
    if cfg.kv_cache and io.kind == "decoder":
        layout = kv_graph.model_kv_layout(model.config)
        wrapper = kv_graph.KvWrapper(model, WRAPPED).eval()
        args = kv_graph.example_inputs(model.config, layout)
        dynamic = kv_graph.dynamic_shapes(layout, cfg.dynamic_axes.batch, cfg.dynamic_axes.sequence)
        input_names, output_names = kv_graph.io_names(layout.num_layers)
    else:
        wrapper = OutputOf(model, io).eval()
        example = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        args = tuple(torch.from_numpy(v) for v in io.feed(example, torch.ones_like(example)).values())
        axes = {}
        if cfg.dynamic_axes.batch:
            axes[0] = torch.export.Dim("batch")
        if cfg.dynamic_axes.sequence:
            axes[1] = torch.export.Dim("sequence")
        dynamic = {"inputs": tuple(dict(axes) for _ in io.inputs)}  # the wrapper takes *inputs
        input_names, output_names = list(io.inputs), list(io.outputs)
    # grouped-query attention without repeating the cache per query head (converter/export/grouped_attention.py)
    with warnings.catch_warnings(), for_export(model, spec.grouped_attention):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        # a failed down-conversion is logged there with a traceback; _check_opset reports it instead
        logging.getLogger("onnxscript").setLevel(logging.ERROR)
        return torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            optimize=False,  # keeps `<linear>.weight` initializers by name for the QDQ surgery
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic,
            opset_version=cfg.opset,
            verbose=False,
        )


def _check_opset(path: Path, cfg: Export) -> None:
    """The exporter writes its own opset and converts the graph down to the recipe's with ONNX's
    version converter; when that fails it only logs, and the graph stays at the exporter's opset.
    Refuse that instead of publishing a model whose opset is not the one the manifest names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    written, opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), cfg.opset
    if written != opset:
        default = type(cfg).model_fields["opset"].default
        raise UserError(f"export.opset {opset}: ONNX's version converter could not take this model from opset "
                        f"{written} down to {opset}; use export.opset {written} or higher ({default} is the default)")


def _needs_external_data(model: torch.nn.Module, cfg: Export) -> bool:
    if cfg.external_data != "auto":
        return cfg.external_data == "always"
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size > _TWO_GB - 64 * 1024**2  # headroom for graph protobuf overhead


def _weight_initializer_names(model: torch.nn.Module, plan: QuantPlan) -> dict[str, str]:
    """Initializer name -> linear name, under every name a weight has: a tied weight exports under
    one of its aliases (the exporter picked `lm_head.weight` over `embed_tokens.weight`)."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    out = {}
    for name in plan.linears:
        for alias in aliases[id(model.get_submodule(name).weight)]:
            out[f"{WRAPPED}.{alias}"] = name
    return out


def _const(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                    const_value=ir.tensor(array, name=name))


def _node(graph: ir.Graph, before: ir.Node, op: str, inputs: list, name: str, outputs: list[str], **attrs) -> ir.Node:
    attributes = [ir.AttrInt64(k, v) for k, v in attrs.items()]
    node = ir.Node("", op, inputs, attributes=attributes, name=name, outputs=[ir.Value(name=o) for o in outputs])
    graph.insert_before(before, [node])
    return node


def _drop_weight_transpose(graph: ir.Graph, old_b: ir.Value) -> None:
    """Remove the float weight and its Transpose once the MatMul no longer reads them."""
    transpose = old_b.producer()
    if transpose is not None and not old_b.uses():
        source = transpose.inputs[0]
        graph.remove(transpose, safe=True)
        if source is not None and source.is_initializer() and not source.uses():
            graph.initializers.pop(source.name)


def _weight_values(sources: list[ir.Value]) -> list[ir.TensorProtocol]:
    """The float tensors behind the weight initializers `sources` (held even after the graph drops them)."""
    values = [source.const_value for source in sources]
    missing = [s.name for s, v in zip(sources, values) if v is None]
    if missing:
        raise RuntimeError(f"weight initializers without a value: {missing}")
    return values


def _lazy_int8(name: str, values: list[ir.TensorProtocol], quants: list) -> ir.Value:
    """The int8 weights of one MatMul, (in, out): each float weight (out, in) quantized per output
    channel, side by side. Computed when the model is written, one MatMul at a time, from the float
    initializers the export wrote (on disk, memory-mapped), so no stage holds every weight at once.
    The float weights are the model's own, exported bit for bit, so this is the same arithmetic as
    quantizing the module's weight in PyTorch."""
    shape = (values[0].shape[1], sum(v.shape[0] for v in values))

    def one(value: ir.TensorProtocol, quant) -> np.ndarray:
        with warnings.catch_warnings():  # a read-only memory map, only ever read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            weight = torch.from_numpy(np.asarray(value.numpy(), dtype=np.float32))
        return quantize_weight(weight, quant.weight_scale).T.numpy()

    def compute() -> ir.Tensor:
        parts = []
        for value, quant in zip(values, quants):
            parts.append(one(value, quant))
            if isinstance(value, ir.ExternalTensor):  # drop the file mapping once read
                value.release()
        return ir.tensor(np.ascontiguousarray(np.concatenate(parts, axis=1)), name=name)

    tensor = ir.LazyTensor(compute, dtype=ir.DataType.INT8, shape=ir.Shape(shape), name=name)
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.INT8), const_value=tensor)


def _quantize_matmul_dynamic(graph: ir.Graph, matmul: ir.Node, name: str, weight: ir.TensorProtocol, quant) -> None:
    """O2/O1: the input is quantized at run time and the MatMul becomes an integer MatMul:

        O2: DynamicQuantizeLinear(x) -> (x_u8, s_x, zp_x); MatMulInteger(x_u8, W_s8, zp_x)
        O1: s_x = max(ReduceMax(|x|, -1), tiny) / 127 per token; x_s8 = Cast(Clip(Round(x / s_x)))
            MatMulInteger(x_s8, W_s8)
    then Cast(int32 -> float) * s_x * s_w (s_w per output channel). ONNX Runtime runs the O2 pattern
    as one DynamicQuantizeMatMul kernel and O1's MatMulInteger as an int8 GEMM.
    """
    w_q = _lazy_int8(f"{name}.weight_quantized", [weight], [quant])  # (in, out)
    w_s = _const(f"{name}.weight_scale", quant.weight_scale.numpy().astype(np.float32))
    for value in (w_q, w_s):
        graph.register_initializer(value)
    x = matmul.inputs[0]
    if quant.act_mode == "dynamic_per_tensor":
        dq = _node(graph, matmul, "DynamicQuantizeLinear", [x], f"{name}/input_quantize",
                   [f"{name}.input_quantized", f"{name}.input_scale", f"{name}.input_zero_point"])
        x_q, x_s, x_zp = dq.outputs
        acc = _node(graph, matmul, "MatMulInteger", [x_q, w_q, x_zp], f"{name}/matmul_integer",
                    [f"{name}.accumulator"]).outputs[0]
    else:
        consts = {k: _const(f"{name}.{k}", np.array(v, dtype=d)) for k, v, d in (
            ("reduce_axes", [-1], np.int64), ("tiny_amax", TINY_AMAX, np.float32),
            ("qmax", INT8_MAX, np.float32), ("qmin", -INT8_MAX, np.float32))}
        for value in consts.values():
            graph.register_initializer(value)
        absx = _node(graph, matmul, "Abs", [x], f"{name}/input_abs", [f"{name}.input_abs"]).outputs[0]
        amax = _node(graph, matmul, "ReduceMax", [absx, consts["reduce_axes"]], f"{name}/input_amax",
                     [f"{name}.input_amax"], keepdims=1).outputs[0]
        amax = _node(graph, matmul, "Max", [amax, consts["tiny_amax"]], f"{name}/input_amax_floor",
                     [f"{name}.input_amax_floored"]).outputs[0]
        x_s = _node(graph, matmul, "Div", [amax, consts["qmax"]], f"{name}/input_scale",
                    [f"{name}.input_scale"]).outputs[0]
        scaled = _node(graph, matmul, "Div", [x, x_s], f"{name}/input_scaled", [f"{name}.input_scaled"]).outputs[0]
        rounded = _node(graph, matmul, "Round", [scaled], f"{name}/input_round", [f"{name}.input_rounded"]).outputs[0]
        clipped = _node(graph, matmul, "Clip", [rounded, consts["qmin"], consts["qmax"]], f"{name}/input_clip",
                        [f"{name}.input_clipped"]).outputs[0]
        x_q = _node(graph, matmul, "Cast", [clipped], f"{name}/input_quantize", [f"{name}.input_quantized"],
                    to=ir.DataType.INT8.value).outputs[0]
        acc = _node(graph, matmul, "MatMulInteger", [x_q, w_q], f"{name}/matmul_integer",
                    [f"{name}.accumulator"]).outputs[0]
    acc_f = _node(graph, matmul, "Cast", [acc], f"{name}/accumulator_float", [f"{name}.accumulator_float"],
                  to=ir.DataType.FLOAT.value).outputs[0]
    if quant.act_mode == "dynamic_per_tensor":  # the order ORT's MatMulIntegerToFloat fusion matches
        scale = _node(graph, matmul, "Mul", [x_s, w_s], f"{name}/output_scale", [f"{name}.output_scale"]).outputs[0]
        y = _node(graph, matmul, "Mul", [acc_f, scale], f"{name}/rescale", [f"{name}.output"]).outputs[0]
    else:  # a per-token scale times the per-channel one would be a (tokens, out) tensor: apply each in turn
        y = _node(graph, matmul, "Mul", [acc_f, x_s], f"{name}/input_rescale", [f"{name}.input_rescaled"]).outputs[0]
        y = _node(graph, matmul, "Mul", [y, w_s], f"{name}/weight_rescale", [f"{name}.output"]).outputs[0]
    old_b, old_y = matmul.inputs[1], matmul.outputs[0]
    out_name = old_y.name
    ir.convenience.replace_all_uses_with(old_y, y, replace_graph_outputs=True)
    graph.remove(matmul, safe=True)
    old_y.name = None
    y.name, y.type, y.shape = out_name, old_y.type, old_y.shape  # the lm_head's is the `logits` output
    _drop_weight_transpose(graph, old_b)


def _shared_input_groups(found: dict[str, ir.Node], plan: QuantPlan) -> list[list[str]]:
    """Planned linears grouped for export, in model order. Static linears whose MatMuls read the same
    tensor with the same activation scale (q/k/v after one norm, gate/up) form one group: quantizing
    that tensor once and multiplying by the concatenated weights computes exactly what separate
    MatMuls would (weights are per output channel), with one int8 kernel instead of several. Every
    other linear (dynamic activations, its own input) is a group of one."""
    groups: dict[object, list[str]] = {}
    for name in plan.linears:
        quant = plan.linears[name]
        key = (id(found[name].inputs[0]), float(quant.act_scale)) if quant.act_mode == "static" else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _quantize_matmuls(graph: ir.Graph, matmuls: list[ir.Node], first: ir.Node, names: list[str],
                      weights: list[ir.TensorProtocol], plan: QuantPlan) -> None:
    """Static W8A8 for one group of linears (see `_shared_input_groups`): one QuantizeLinear ->
    DequantizeLinear on the shared input, the int8 weights (in, out) side by side behind one
    per-channel DequantizeLinear, one MatMul, and for a group of several a Split back into each
    linear's output (keeping its name)."""
    quants = [plan.linears[n] for n in names]
    if quants[0].act_mode != "static":
        _quantize_matmul_dynamic(graph, matmuls[0], names[0], weights[0], quants[0])
        return
    name = matmul_name(names)
    w_scale = np.concatenate([lq.weight_scale.numpy().astype(np.float32) for lq in quants])
    inits = [
        _lazy_int8(f"{name}{WEIGHT_SUFFIX}", weights, quants),
        _const(f"{name}.weight_scale", w_scale),
        _const(f"{name}.weight_zero_point", np.zeros(w_scale.shape, dtype=np.int8)),
        _const(f"{name}.input_scale", np.array(float(quants[0].act_scale), dtype=np.float32)),
        _const(f"{name}.input_zero_point", np.array(0, dtype=np.int8)),
    ]
    for value in inits:
        graph.register_initializer(value)
    w_q, w_s, w_zp, x_s, x_zp = inits
    q = ir.Node("", "QuantizeLinear", [first.inputs[0], x_s, x_zp], name=f"{name}/input_quantize",
                outputs=[ir.Value(name=f"{name}.input_quantized")])
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], x_s, x_zp], name=f"{name}/input_dequantize",
                 outputs=[ir.Value(name=f"{name}.input_dequantized")])
    dq_w = ir.Node("", "DequantizeLinear", [w_q, w_s, w_zp], attributes={"axis": ir.AttrInt64("axis", 1)},
                   name=f"{name}{WEIGHT_DQ_SUFFIX}", outputs=[ir.Value(name=f"{name}.weight_dequantized")])
    old_weights = [m.inputs[1] for m in matmuls]
    if len(matmuls) == 1:
        graph.insert_before(first, [q, dq, dq_w])
        first.replace_input_with(0, dq.outputs[0])
        first.replace_input_with(1, dq_w.outputs[0])
    else:
        sizes = _const(f"{name}.split_sizes", np.array([lq.out_features for lq in quants], dtype=np.int64))
        graph.register_initializer(sizes)
        matmul = ir.Node("", "MatMul", [dq.outputs[0], dq_w.outputs[0]], name=f"{name}/matmul",
                         outputs=[ir.Value(name=f"{name}.output")])
        split = ir.Node("", "Split", [matmul.outputs[0], sizes], attributes={"axis": ir.AttrInt64("axis", -1)},
                        name=f"{name}/split", num_outputs=len(matmuls))
        graph.insert_before(first, [q, dq, dq_w, matmul, split])
        for old, new in zip(matmuls, split.outputs, strict=True):
            old_y = old.outputs[0]
            out_name = old_y.name
            ir.convenience.replace_all_uses_with(old_y, new, replace_graph_outputs=True)
            graph.remove(old, safe=True)
            old_y.name = None
            new.name, new.type, new.shape = out_name, old_y.type, old_y.shape
    for old_b in old_weights:
        _drop_weight_transpose(graph, old_b)


def _quantize_embedding(graph: ir.Graph, model: torch.nn.Module, quant: EmbeddingQuant, layout: str) -> int:
    """Every Gather of the token embedding table reads an int8 copy instead, in one of two layouts:

        gather_rows:      Gather(E_int8 (vocab, hidden), ids) -> Cast(float) -> Mul(Gather(s (vocab, 1), ids))
        dequantize_table: DequantizeLinear(E_int8, s (vocab,), axis 0) -> Gather(ids)

    `gather_rows` dequantizes only the rows a step reads; ONNX Runtime needs it, since it keeps DQ
    nodes out of constant folding and so would dequantize the whole table on every run (SmolLM2's
    49152 x 576 table: 10.9 ms a run against 0.01 ms, measured on a 2-core EPYC). After the
    Gather, opset-18 DequantizeLinear cannot take a per-row scale, hence Cast and Mul: the same
    float32 product q * s. TensorRT refuses an int8 constant anywhere but as a DequantizeLinear
    input, so GPU targets get `dequantize_table`, the explicit-quantization pattern its builder
    folds. The float table is dropped unless something else still reads it (a float lm_head tied
    to it).

    Returns:
        the number of Gathers rewritten.

    Raises:
        RuntimeError: no Gather reads the table (an exporter change: a bug, not user error).
    """
    table = model.get_submodule(quant.name).weight
    aliases = {f"{WRAPPED}.{n}" for n, p in model.named_parameters(remove_duplicate=False) if p is table}
    source = next((v for name, v in graph.initializers.items() if name in aliases), None)
    gathers = [] if source is None else [n for n, _ in source.uses() if n.op_type == "Gather" and n.inputs[0] is source]
    if not gathers:
        raise RuntimeError(f"embedding {quant.name}: no Gather reads its table {sorted(aliases)}")
    by_row = layout == "gather_rows"
    scales = quant.weight_scale.float().numpy()
    int8 = _const(f"{quant.name}{EMBEDDING_SUFFIX}", quantize_weight(table, quant.weight_scale).numpy())
    scale = _const(f"{quant.name}{EMBEDDING_SCALE_SUFFIX}", scales.reshape(-1, 1) if by_row else scales)
    zero = _const(f"{quant.name}.row_zero_point", np.zeros(scales.shape, dtype=np.int8))
    for value in (int8, scale) if by_row else (int8, scale, zero):
        graph.register_initializer(value)
    if not by_row:
        table_dq = _node(graph, gathers[0], "DequantizeLinear", [int8, scale, zero], f"{quant.name}/table_dequantize",
                         [f"{quant.name}.table_dequantized"], axis=0)
    for i, gather in enumerate(gathers):
        if "axis" in gather.attributes and gather.attributes["axis"].as_int() != 0:
            raise RuntimeError(f"{gather.name}: reads embedding {quant.name} on axis "
                               f"{gather.attributes['axis'].as_int()}, not by row")
        if not by_row:
            gather.replace_input_with(0, table_dq.outputs[0])
            continue
        base = f"{quant.name}/embedding{i or ''}"
        ids = gather.inputs[1]
        rows = _node(graph, gather, "Gather", [int8, ids], f"{base}_gather", [f"{base}_rows_int8"])
        cast = _node(graph, gather, "Cast", [rows.outputs[0]], f"{base}_cast", [f"{base}_rows"], to=int(ir.DataType.FLOAT))
        row_scales = _node(graph, gather, "Gather", [scale, ids], f"{base}_scale_gather", [f"{base}_row_scales"])
        mul = _node(graph, gather, "Mul", [cast.outputs[0], row_scales.outputs[0]], f"{base}_dequantize", [f"{base}_out"])
        old = gather.outputs[0]
        out_name = old.name
        ir.convenience.replace_all_uses_with(old, mul.outputs[0], replace_graph_outputs=True)
        graph.remove(gather, safe=True)
        old.name = None
        mul.outputs[0].name, mul.outputs[0].type, mul.outputs[0].shape = out_name, old.type, old.shape
    if not source.uses():
        graph.initializers.pop(source.name)
    return len(gathers)


def _gemm_to_matmul(graph: ir.Graph, weights: dict[str, str]) -> int:
    """Rewrite `Gemm(x, W, b, transB=1)` on a planned linear's weight as `MatMul(x, Transpose(W)) + b`.

    The exporter emits Gemm for linears applied to 2-D activations (OPT's fc1/fc2); ONNX Runtime does
    not fuse DequantizeLinear -> Gemm into an int8 kernel, but does fuse the MatMul form.
    Returns how many Gemms were rewritten.

    Raises:
        RuntimeError: such a Gemm has transA, transB=0 or alpha/beta other than 1 (not an nn.Linear).
    """
    rewritten = 0
    for gemm in list(graph):
        if gemm.op_type != "Gemm" or gemm.inputs[1] is None or gemm.inputs[1].name not in weights:
            continue
        attrs = {k: a.value for k, a in gemm.attributes.items()}
        if attrs.get("transA", 0) != 0 or attrs.get("transB", 0) != 1 or attrs.get("alpha", 1.0) != 1.0 \
                or attrs.get("beta", 1.0) != 1.0:
            raise RuntimeError(f"linear {weights[gemm.inputs[1].name]}: Gemm {gemm.name} with {attrs} is not x W^T + b")
        x, w, bias = (list(gemm.inputs) + [None])[:3]
        base = gemm.name or w.name
        axes = _const(f"{base}.unsqueeze_axes", np.array([0], dtype=np.int64))
        graph.register_initializer(axes)
        # (1, N, K): a 2-D MatMul + Add would be fused straight back into a (float) Gemm by ORT's
        # MatMulAddFusion before its QDQ fusions run; the 3-D form fuses into MatMulIntegerToFloat.
        unsqueeze = ir.Node("", "Unsqueeze", [x, axes], name=f"{base}/unsqueeze", outputs=[ir.Value(name=f"{base}.x3d")])
        transpose = ir.Node("", "Transpose", [w], attributes={"perm": ir.AttrInt64s("perm", [1, 0])},
                            name=f"{base}/weight_transpose", outputs=[ir.Value(name=f"{base}.weight_t")])
        matmul = ir.Node("", "MatMul", [unsqueeze.outputs[0], transpose.outputs[0]], name=f"{base}/matmul",
                         outputs=[ir.Value(name=f"{base}.matmul")])
        nodes = [unsqueeze, transpose, matmul]
        if bias is not None:
            nodes.append(ir.Node("", "Add", [matmul.outputs[0], bias], name=f"{base}/bias",
                                 outputs=[ir.Value(name=f"{base}.biased")]))
        nodes.append(ir.Node("", "Squeeze", [nodes[-1].outputs[0], axes], name=f"{base}/squeeze",
                             outputs=[ir.Value(name=f"{base}.out")]))
        graph.insert_before(gemm, nodes)
        out, new = gemm.outputs[0], nodes[-1].outputs[0]
        is_output, name = out.is_graph_output(), out.name
        new.type, new.shape = out.type, out.shape
        ir.convenience.replace_all_uses_with(out, new, replace_graph_outputs=True)
        graph.remove(gemm, safe=True)
        if is_output:  # a classifier's Gemm produces `logits`: the graph output keeps its name
            out.name, new.name = f"{name}.replaced", name
        rewritten += 1
    return rewritten


def _strip_export_metadata(onnx_model: ir.Model) -> None:
    """Drop the exporter's per-node metadata (Python stack traces with absolute file paths, FX
    nodes): it makes artifacts differ between machines and leaks the build host's paths."""
    for node in ir.traversal.RecursiveGraphIterator(onnx_model.graph):
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()
    for value in (*onnx_model.graph.inputs, *onnx_model.graph.outputs, *onnx_model.graph.initializers.values()):
        value.metadata_props.clear()


def _fold_constant_subgraphs(onnx_model: ir.Model) -> None:
    """Fold shape arithmetic the exporter leaves as small constant subgraphs (e.g. the axes of every
    RMSNorm's ReduceMean come out of a Reshape of Constants): TensorRT's ONNX parser needs those as
    build-time constants. Q/DQ nodes are never folded (that would turn int8 weights back into float),
    and the size limits keep weight-sized tensors (the tied lm_head's transpose) unfolded."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.optimizer import fold_constants

    fold_constants(onnx_model, should_fold=lambda node: False if node.op_type in _QDQ_OPS else None)
    RemoveUnusedNodesPass()(onnx_model)
    _split_sizes_below_opset_18(onnx_model)


def _split_sizes_below_opset_18(onnx_model: ir.Model) -> None:
    """The folder turns SplitToSequence -> SequenceAt (GPT-2's fused c_attn) into `Split(num_outputs=n)`,
    an opset-18 attribute, whatever the model's opset. Below 18, give each such Split its sizes as the
    `split` input instead (ONNX Runtime refuses the attribute there)."""
    if onnx_model.opset_imports.get("", 18) >= 18:
        return
    for node in onnx_model.graph:
        if node.op_type != "Split" or "num_outputs" not in node.attributes:
            continue
        parts = node.attributes.pop("num_outputs").as_int()
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
        shape = node.inputs[0].shape
        size = shape[axis] if shape is not None else None
        if not isinstance(size, int) or size % parts:  # the folder only writes num_outputs for an even split
            raise RuntimeError(f"{node.name}: cannot size Split(num_outputs={parts}) on axis {axis} of {shape}")
        sizes = _const(f"{node.name}_sizes", np.full(parts, size // parts, dtype=np.int64))
        onnx_model.graph.register_initializer(sizes)
        node.resize_inputs(2)
        node.replace_input_with(1, sizes)


def _rsqrt_as_div(graph: ir.Graph) -> int:
    """Rewrite `Mul(x, Reciprocal(Sqrt(v)))` as `Div(x, Sqrt(v))`; returns how many.

    PyTorch exports RMSNorm's `x * rsqrt(mean(x^2) + eps)` as Sqrt -> Reciprocal -> Mul, which ONNX
    Runtime's SimplifiedLayerNormalization fusion does not match (it looks for Sqrt -> Div). Unfused,
    each RMSNorm runs as six small kernels; on SmolLM2-135M decode that was a tenth of a step.
    Same arithmetic up to float rounding of the division.
    """
    rewritten = 0
    for recip in list(graph):
        sqrt = recip.inputs[0].producer() if recip.op_type == "Reciprocal" else None
        if sqrt is None or sqrt.op_type != "Sqrt":
            continue
        for use in list(recip.outputs[0].uses()):
            mul = use.node
            if mul.op_type != "Mul":
                continue
            out = mul.outputs[0]
            div = _node(graph, mul, "Div", [mul.inputs[1 - use.idx], sqrt.outputs[0]], f"{mul.name}/as_div",
                        [f"{out.name}.div"]).outputs[0]
            ir.convenience.replace_all_uses_with(out, div, replace_graph_outputs=True)
            graph.remove(mul, safe=True)
            name, out.name = out.name, None
            div.name, div.type, div.shape = name, out.type, out.shape
            rewritten += 1
        if not recip.outputs[0].uses():
            graph.remove(recip, safe=True)
    return rewritten


def float_graph(model: torch.nn.Module, out_path: Path, cfg: Export) -> Path:
    """`model` exported to FP32 ONNX and put through the same passes as the artifact, with nothing
    quantized: the fair float baseline for speed comparisons (`insert_qdq` with an empty plan).
    The raw export is written beside `out_path` as `<stem>.raw.onnx`."""
    raw = export_fp32(model, out_path.with_name(f"{out_path.stem}.raw.onnx"), cfg)
    return insert_qdq(raw, out_path, model, QuantPlan(linears={}, excluded=[]), cfg).path


def insert_qdq(fp32_path: Path, out_path: Path, model: torch.nn.Module, plan: QuantPlan, cfg: Export,
               embedding_layout: str | None = "gather_rows") -> QdqResult:
    """Write the W8A8 QDQ model for `plan` next to nothing else: one file (plus external data if big).

    `embedding_layout` says how an int8 embedding table (`plan.embedding`) is read: `gather_rows`
    (ONNX Runtime) or `dequantize_table` (TensorRT, MIGraphX); see `Recipe.embedding_layout`.

    Raises:
        RuntimeError: a planned linear was not found as `MatMul(x, Transpose(weight))` in the graph
            (an exporter change or an architecture the table describes wrongly: a bug, not user error).
    """
    onnx_model = ir.load(fp32_path)
    graph = onnx_model.graph
    by_initializer = _weight_initializer_names(model, plan)
    _gemm_to_matmul(graph, by_initializer)
    found: dict[str, ir.Node] = {}
    sources: dict[str, ir.Value] = {}  # linear -> its float weight initializer
    for node in list(graph):
        if node.op_type != "MatMul":
            continue
        producer = node.inputs[1].producer()
        source = producer.inputs[0] if producer is not None and producer.op_type == "Transpose" else None
        name = by_initializer.get(source.name) if source is not None else None
        if name is None:
            continue
        if name in found:
            raise RuntimeError(f"linear {name}: weight feeds more than one MatMul ({found[name].name}, {node.name})")
        found[name], sources[name] = node, source
    missing = [n for n in plan.linears if n not in found]
    if missing:
        raise RuntimeError(f"no MatMul(x, Transpose(weight)) found for {len(missing)} linear(s): {missing[:5]}")
    order = {id(node): i for i, node in enumerate(graph)}
    groups = _shared_input_groups(found, plan)
    for names in track(groups, "insert Q/DQ", total=len(groups)):
        matmuls = [found[n] for n in names]
        first = min(matmuls, key=lambda node: order[id(node)])  # the merged nodes go before it
        _quantize_matmuls(graph, matmuls, first, names, _weight_values([sources[n] for n in names]), plan)
    if plan.embedding is not None:
        _quantize_embedding(graph, model, plan.embedding, embedding_layout or "gather_rows")
    _fold_constant_subgraphs(onnx_model)
    _rsqrt_as_div(graph)
    if cfg.attention == "onnxruntime":
        from converter.export.ort_fusion import fuse_attention

        note(f"  attention: {fuse_attention(onnx_model, model)} layers as ONNX Runtime GroupQueryAttention")
    _strip_export_metadata(onnx_model)
    external = _needs_external_data(model, cfg)
    # Tensors still pointing into the FP32 work file's external data: ir.save would keep the
    # reference (into a file that is deleted) instead of writing the bytes, so load them.
    ir.external_data.load_to_model(onnx_model)
    ir.save(onnx_model, out_path, external_data=f"{out_path.name}.data" if external else None)
    size = out_path.stat().st_size + (out_path.with_name(f"{out_path.name}.data").stat().st_size if external else 0)
    note(f"  QDQ inserted: {len(found)} linears as {len(groups)} MatMuls -> {out_path.name} ({size / 1e6:.1f} MB)")
    return QdqResult(path=out_path, quantized_matmuls=len(groups), external_data=external, size_bytes=size)
