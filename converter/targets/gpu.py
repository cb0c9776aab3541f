"""GPU targets: TensorRT engines for A100/H100 and MIGraphX programs for MI250X/MI300.

Each builds its engine or program beside `model.onnx` in the artifact folder and reports the same
fields, which the model-repository code reads: `backend`, `compute_capability` (TensorRT) or
`gfx_arch` (MIGraphX), `engine_file` (null when not built, e.g. `--dry-run`) and
`planned_engine_file`. With `dry_run` nothing is built: the exact plan is recorded instead.
"""

from __future__ import annotations

from pathlib import Path

from converter.targets.engine_options import EngineOptions
from converter.targets.migraphx import MIGRAPHX_GPUS, MIGRAPHX_MODULE
from converter.quant.quantize import QuantPlan
from converter.targets.registry import BuildReport, Target
from converter.targets.tensorrt import TENSORRT_GPUS, TENSORRT_MODULE

_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
_AMD_KFD = Path("/dev/kfd")


def _nvidia_device() -> str | None:
    present = _NVIDIA_GPUS.is_dir() and any(_NVIDIA_GPUS.iterdir())
    return None if present else "no NVIDIA GPU (no NVIDIA driver device found)"


def _amd_device() -> str | None:
    return None if _AMD_KFD.exists() else "no AMD GPU (no ROCm kernel driver /dev/kfd)"


def _weight_linears(details: dict) -> set[str]:
    return set(details.get("network", {}).get("int8_matmul_linears", []))


def build_tensorrt(target: str, model_path: Path, work_dir: Path, plan: QuantPlan, engine: EngineOptions,
                   dry_run: bool = False) -> BuildReport:
    """Build (or with `dry_run` only plan) the TensorRT engine; INT8 coverage from the parsed network."""
    from converter.targets import tensorrt

    if dry_run:
        details = {**tensorrt.plan_build(target, model_path, engine, tensorrt.installed_tensorrt_version()),
                   "engine_file": None, "dry_run": True}
        return BuildReport(target, "tensorrt", {}, 0, [], details=details)
    details = tensorrt.build_engine(target, model_path, engine)
    fused = _weight_linears(details)
    return BuildReport(target, "tensorrt", {"int8_layers": details["int8_layers"]}, len(fused & set(plan.linears)),
                       [n for n in plan.linears if n not in fused], details=details)


def build_migraphx(target: str, model_path: Path, work_dir: Path, plan: QuantPlan, engine: EngineOptions,
                   dry_run: bool = False) -> BuildReport:
    """Compile (or with `dry_run` only plan) the MIGraphX program.

    MIGraphX's instructions do not name the ONNX nodes they came from, so which linears run in int8
    is unknown: `fused_linears` and `unfused_linears` are None, and the report carries the compiled
    program's int8 instructions (`int8_dot_instructions`, `program_ops`) instead."""
    from converter.targets import migraphx

    if dry_run:
        details = {**migraphx.plan_build(target, model_path, engine), "engine_file": None, "dry_run": True}
        return BuildReport(target, "migraphx", {}, 0, [], details=details)
    details = migraphx.build_program(target, model_path, engine)
    int8 = {"int8 dot instructions": details["int8_dot_instructions"]} if details["int8_dot_instructions"] else {}
    return BuildReport(target, "migraphx", int8, None, None, details=details)


def _tensorrt_runner(model_path: Path, build: BuildReport):
    from converter.targets.tensorrt import tensorrt_runner

    return tensorrt_runner(model_path.parent / build.details["engine_file"], build.details["version_compatible"])


def _migraphx_runner(model_path: Path, build: BuildReport):
    from converter.targets.migraphx import MigraphxRunner

    return MigraphxRunner(model_path.parent / build.details["engine_file"], model_path, name="int8-migraphx")


GPU_TARGETS: dict[str, Target] = {
    **{name: Target(name=name, backend="tensorrt", hardware=f"{spec.gpu} (compute capability {spec.compute_capability})",
                    requires=(TENSORRT_MODULE,), build=build_tensorrt, runner=_tensorrt_runner, gpu=True,
                    device=_nvidia_device)
       for name, spec in TENSORRT_GPUS.items()},
    **{name: Target(name=name, backend="migraphx", hardware=f"{gpu} ({arch})", requires=(MIGRAPHX_MODULE,),
                    build=build_migraphx, runner=_migraphx_runner, gpu=True, device=_amd_device)
       for name, (arch, gpu) in MIGRAPHX_GPUS.items()},
}
