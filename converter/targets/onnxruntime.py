"""The ONNX Runtime target: session creation with the graph optimized, every quantized linear checked
fused into an int8 kernel, and a Polygraphy-style runner."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import TYPE_CHECKING

from converter.export.qdq_names import WEIGHT_SUFFIX, linears_of
from converter.targets.base import BuildReport, Target

if TYPE_CHECKING:  # annotations only: a target does not depend on the quantization stage
    from converter.quant.quantize import QuantPlan

# Kernels that prove a MatMul runs in int8 in ONNX Runtime's optimized graph.
ORT_INT8_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger")
ORT_U8_WEIGHT_SUFFIX = "_s8_2_u8"  # ONNX Runtime's name for an int8 weight it converted to uint8


def build_onnxruntime(target: str, model_path: Path, work_dir: Path, plan: QuantPlan, **_) -> BuildReport:
    """Create the ORT session, save its optimized graph and check every quantized linear fused.

    Returns a report whose `unfused_linears` lists linears whose int8 weight does not feed an int8
    kernel; the pipeline treats a non-empty list as a failed build.
    """
    import onnx

    from converter.targets.runners import onnxruntime_session

    optimized = work_dir / "ort_optimized.onnx"
    onnxruntime_session(model_path, optimized_model_path=optimized)
    graph = onnx.load(str(optimized), load_external_data=False).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    fused = set()
    for node in graph.node:
        if node.op_type in ORT_INT8_KERNELS:
            # ORT renames a weight it rewrites as uint8 for its exact kernels (see onnxruntime_session)
            names = (name.removesuffix(ORT_U8_WEIGHT_SUFFIX) for name in node.input)
            fused.update(linear for name in names if name.endswith(WEIGHT_SUFFIX)
                         for linear in linears_of(name.removesuffix(WEIGHT_SUFFIX)))
    optimized.unlink()
    for extra in work_dir.glob("ort_optimized.onnx*"):
        extra.unlink()
    return BuildReport(
        target=target,
        backend="onnxruntime",
        int8_kernels={k: ops[k] for k in ORT_INT8_KERNELS if ops[k]},
        fused_linears=len(fused),
        unfused_linears=[n for n in plan.linears if n not in fused],
        op_counts=dict(sorted(ops.items())),
    )


def _onnxruntime_runner(model_path: Path, build: BuildReport | None = None):
    from converter.targets.runners import onnxruntime_runner

    return onnxruntime_runner(model_path, name="int8-onnxruntime")


def _int8_kernels_here() -> str:
    from converter.targets.runners import int8_kernels_here

    return int8_kernels_here()


def target(name: str, hardware: str, ci_labels: tuple[str, ...]) -> Target:
    """An ONNX Runtime target on `hardware`, built on CI machines labelled `ci_labels`."""
    return Target(name=name, backend="onnxruntime", hardware=hardware, requires=("onnxruntime",),
                  build=build_onnxruntime, runner=_onnxruntime_runner, ci_labels=ci_labels,
                  triton_platform="onnxruntime_onnx", triton_kind="KIND_CPU", ort_graph=True,
                  int8_here=_int8_kernels_here)
