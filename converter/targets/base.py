"""What a target is (`Target`: its builder, runner and data) and what a build reports (`BuildReport`)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


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
    """A named deployment target and everything other modules need to know about it: how to build and
    run it, where CI builds it, how Triton serves it, and which graph forms it accepts."""

    name: str
    backend: str
    hardware: str
    requires: tuple[str, ...]  # Python modules the backend needs
    build: Callable[..., BuildReport]  # (target, model_path, work_dir, plan, engine=, dry_run=)
    runner: Callable[[Path, BuildReport], object]  # (model_path, build report) -> runner
    gpu: bool = False
    preflight: Callable[[], str | None] = lambda: None  # why this machine lacks the hardware, or None
    int8_here: Callable[[], str] | None = None  # what runs the int8 kernels on this machine (`targets`)
    ci_labels: tuple[str, ...] = ()  # labels of the CI machine its build runs on (GitHub `runs-on`)
    triton_platform: str | None = None  # Triton `platform` serving the built model; None: not served
    triton_kind: str = "KIND_CPU"  # Triton instance group kind
    triton_refusal: str = ""  # why Triton cannot serve it (when triton_platform is None)
    ort_graph: bool = False  # runs ONNX Runtime's own graph forms: dynamic quantization ops (O1/O2),
    #   contrib ops (GroupQueryAttention) and int8 embedding rows gathered before scaling
    strict_qdq: bool = False  # the check stage enforces TensorRT's explicit-quantization rules
    fixed_shape: str = ""  # what fixes its input shapes, so a growing input (KV cache, generation) cannot run; "": none

    def availability(self) -> tuple[bool, str]:
        """(can build and run here, why not): Python modules first, then the device."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        reasons = [f"missing Python module(s): {', '.join(missing)}"] if missing else []
        device = self.preflight()
        if device:
            reasons.append(device)
        return (not reasons, "; ".join(reasons) or "ok")
