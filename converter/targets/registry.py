"""Target registry: named deployment targets, each with a backend, a builder and a runner.

Backends import lazily, so a target whose libraries are missing only fails when it is selected.
"""

from __future__ import annotations

import collections
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from converter.export.qdq_names import WEIGHT_SUFFIX, linears_of
from converter.quant.quantize import QuantPlan

# Kernels that prove a MatMul runs in int8 in ONNX Runtime's optimized graph.
ORT_INT8_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger")


@dataclass
class BuildReport:
    target: str
    backend: str
    int8_kernels: dict[str, int]  # kernel op type -> count
    fused_linears: int | None  # None: the backend does not say which linears run in int8 (MIGraphX)
    unfused_linears: list[str] | None
    op_counts: dict[str, int] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # GPU targets: plan, engine file, inspector results

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "details"}
        return {**out, **self.details}


@dataclass(frozen=True)
class Target:
    name: str
    backend: str
    hardware: str
    requires: tuple[str, ...]  # Python modules the backend needs
    build: Callable[..., BuildReport]  # (target, model_path, work_dir, plan, engine=, dry_run=)
    runner: Callable[[Path, BuildReport], object]  # (model_path, build report) -> runner
    gpu: bool = False
    device: Callable[[], str | None] = lambda: None  # why the hardware is missing, or None

    def availability(self) -> tuple[bool, str]:
        """(can build and run here, why not): Python modules first, then the device."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        reasons = [f"missing Python module(s): {', '.join(missing)}"] if missing else []
        device = self.device()
        if device:
            reasons.append(device)
        return (not reasons, "; ".join(reasons) or "ok")


ORT_U8_WEIGHT_SUFFIX = "_s8_2_u8"  # ONNX Runtime's name for an int8 weight it converted to uint8


def build_onnxruntime(target: str, model_path: Path, work_dir: Path, plan: QuantPlan, **_) -> BuildReport:
    """Create the ORT session, save its optimized graph and check every quantized linear fused.

    Returns a report whose `unfused_linears` lists linears whose int8 weight does not feed an int8
    kernel; the pipeline treats a non-empty list as a failed build.
    """
    import onnx

    from converter.parity.runners import onnxruntime_session

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
    from converter.parity.runners import onnxruntime_runner

    return onnxruntime_runner(model_path, name="int8-onnxruntime")


from converter.targets.gpu import GPU_TARGETS  # noqa: E402  (defined with Target and BuildReport above)

TARGETS: dict[str, Target] = {**{
    "cpu-onnxruntime": Target(
        name="cpu-onnxruntime",
        backend="onnxruntime",
        hardware="x86-64 / arm64 CPU (int8 kernels: VNNI, AMX, NEON dot product)",
        requires=("onnxruntime",),
        build=build_onnxruntime,
        runner=_onnxruntime_runner,
    ),
}, **GPU_TARGETS}
