"""How the exported QDQ graph names a quantized MatMul, and which linears it computes.

A linear quantized on its own keeps its module name (`model.layers.0.mlp.down_proj`). Linears that
read the same input with the same static scale (q/k/v, gate/up) are exported as one int8 MatMul
followed by a Split, named after all of them in brace form: `model.layers.0.self_attn.{q_proj,k_proj,v_proj}`.
Initializers and nodes carry that name with the usual suffixes (`.weight_quantized`, `/weight_dequantize`).
Kept free of heavy imports: the TensorRT and MIGraphX stages read these names too.
"""

from __future__ import annotations

WEIGHT_SUFFIX = ".weight_quantized"  # the int8 weight initializer of a quantized MatMul
WEIGHT_DQ_SUFFIX = "/weight_dequantize"  # the DequantizeLinear node of that weight
EMBEDDING_SUFFIX = ".weight_int8"  # an int8 embedding table (quantization.embedding: int8)
EMBEDDING_SCALE_SUFFIX = ".row_scale"  # its (vocab, 1) float32 scales


def matmul_name(linears: list[str]) -> str:
    """The name of the MatMul computing `linears` (in output order): one linear's own name, or the
    common module prefix followed by the members in braces."""
    if len(linears) == 1:
        return linears[0]
    parts = [name.split(".") for name in linears]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = ".".join(parts[0][:common])
    members = ",".join(".".join(p[common:]) for p in parts)
    return f"{prefix}.{{{members}}}" if prefix else f"{{{members}}}"


def linears_of(name: str) -> list[str]:
    """The linears a MatMul name computes (the inverse of `matmul_name`)."""
    if not name.endswith("}") or "{" not in name:
        return [name]
    prefix, _, members = name[:-1].partition("{")
    return [prefix + member for member in members.split(",")]
