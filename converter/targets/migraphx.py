"""MIGraphX programs for AMD Instinct GPUs (MI250X: gfx90a, MI300: gfx942).

`migraphx.parse_onnx` with the recipe's dimensions, `program.compile(get_target("gpu"))`, then
`migraphx.save` writes the `.mxr` program beside the model. MIGraphX compiles for fixed input sizes
here (batch x sequence at the recipe's `opt` values): its dynamic-shape support does not cover every
operator of a decoder graph, and one compiled size per program is how it is served.
A KV-cache graph is refused (`KV_CACHE_REFUSAL`): its past grows by one token per decode step, so
it would need one program per past length (parity's prefill, then every generation step), and its
present outputs concatenate rather than write into a fixed-size cache buffer as MIGraphX LLM
deployments do.
MIGraphX ships with ROCm, not on PyPI: everything is behind an availability check.
"""

from __future__ import annotations

import collections
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from converter.errors import UserError
from converter.progress import note
from converter.targets.base import BuildReport, Target
from converter.targets.engine_options import EngineOptions

if TYPE_CHECKING:  # annotations only: a target does not depend on the quantization stage
    from converter.quant.quantize import QuantPlan

MIGRAPHX_MODULE = "migraphx"
MIGRAPHX_GPUS = {"mi250x-migraphx": ("gfx90a", "AMD Instinct MI250X"), "mi300-migraphx": ("gfx942", "AMD Instinct MI300")}
_KFD_NODES = Path("/sys/class/kfd/kfd/topology/nodes")
FIXED_SHAPE = "MIGraphX compiles one fixed input shape per program"
KV_CACHE_REFUSAL = (f"{FIXED_SHAPE} and a KV-cache graph's past grows every "
                    "decode step; use export.kv_cache: false for MIGraphX targets")


def program_file_name(target: str, gfx_arch: str, batch: int, sequence: int) -> str:
    return f"model.{target}.{gfx_arch}.b{batch}s{sequence}.mxr"


def visible_gfx_archs() -> list[str]:
    """gfx names of the AMD GPUs the ROCm kernel driver exposes (`gfx_target_version` 90010 -> gfx90a)."""
    archs = []
    for props in sorted(_KFD_NODES.glob("*/properties")) if _KFD_NODES.is_dir() else []:
        for line in props.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "gfx_target_version" and int(value) > 0:
                v = int(value)
                archs.append(f"gfx{v // 10000}{(v // 100) % 100:x}{v % 100:x}")
    return archs


def plan_build(target: str, model_path: Path, options: EngineOptions) -> dict:
    """What a MIGraphX target builds: what `--dry-run` prints and records.

    Raises:
        UserError: a KV-cache graph (the recipe check refuses it first; this guards direct calls).
    """
    from converter.export.kv_graph import graph_io_names, graph_kv_layout

    if graph_kv_layout(model_path) is not None:
        raise UserError(f"target {target}: {KV_CACHE_REFUSAL}")
    gfx_arch, gpu = MIGRAPHX_GPUS[target]
    batch, sequence = options.batch.opt, options.sequence.opt
    input_dims = {name: [batch, sequence] for name in graph_io_names(model_path)[0]}
    return {
        "backend": "migraphx",
        "gpu": gpu,
        "compute_capability": None,
        "gfx_arch": gfx_arch,
        "input_dims": input_dims,
        "compile_target": "gpu",
        "offload_copy": True,
        "fast_math": options.migraphx_fast_math,
        "planned_engine_file": program_file_name(target, gfx_arch, batch, sequence),
    }


def build_program(target: str, model_path: Path, options: EngineOptions) -> dict:
    """Parse, compile and save the MIGraphX program for `target` beside `model_path`.

    Raises:
        UserError: no AMD GPU of the target's architecture is visible.
    """
    import migraphx

    plan = plan_build(target, model_path, options)
    archs = visible_gfx_archs()
    if plan["gfx_arch"] not in archs:
        raise UserError(f"target {target}: needs an AMD GPU {plan['gfx_arch']}, visible: {archs or 'none'}")
    start = time.perf_counter()
    program = migraphx.parse_onnx(str(model_path), map_input_dims=plan["input_dims"])
    # offload_copy: inputs and outputs live in host memory, so the runner passes numpy arrays
    program.compile(migraphx.get_target("gpu"), offload_copy=True, fast_math=plan["fast_math"])
    seconds = time.perf_counter() - start
    migraphx.save(program, str(model_path.parent / plan["planned_engine_file"]), format="msgpack")
    note(f"  {target}: program {plan['planned_engine_file']} compiled in {seconds:.1f} s")
    ops = program_ops(str(program))
    int8_dots = sum(n for op, n in ops.items() if any(name in op for name in INT8_DOT_OPS))
    return {**plan, "engine_file": plan["planned_engine_file"], "build_seconds": round(seconds, 2),
            "program_ops": ops, "int8_dot_instructions": int8_dots}


# One instruction of MIGraphX's program listing (`print_instruction` in its program.cpp):
# `@12 = quant_dot(@10,@11) -> int32_type, {..}`, `@0 = @param:input_ids -> int64_type, {..}`, and on
# a compiled GPU program `main:@7 = gpu::code_object[code_object=..,symbol_name=mlir_quant_dot,..](..)`.
_INSTRUCTION = re.compile(r"^\s*(?:\(\d+\)\s*)?[\w:]*@\w+\s*=\s*([@\w:]+)")
_SYMBOL = re.compile(r"symbol_name=(\w+)")
# int8 matrix products: the `quant_dot` operator, its MLIR kernels (`mlir_quant_dot...`) and rocBLAS's `gpu::quant_gemm`
INT8_DOT_OPS = ("quant_dot", "quant_gemm")


def program_ops(listing: str) -> dict[str, int]:
    """Instruction count per operator in a MIGraphX program listing (`str(program)`); a compiled GPU
    kernel counts under its kernel symbol, which names the ops it fused (`mlir_quant_dot_add`).

    MIGraphX instructions do not carry the ONNX node names, so this shows which int8 operators the
    compiled program holds (`quant_dot`, `gpu::quant_gemm`), not which linears they came from.
    """
    ops = collections.Counter()
    for line in listing.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        op = match.group(1)
        symbol = _SYMBOL.search(line) if "code_object" in op else None
        ops[symbol.group(1) if symbol else op.split(":")[0] if op.startswith("@") else op] += 1
    return dict(sorted(ops.items()))


class MigraphxRunner(BaseRunner):
    """Runs a saved `.mxr` program; the same `activate / infer(dict) -> dict` shape as every runner.

    Input element types and output names come from the ONNX graph the program was compiled from;
    input shapes from the program (fixed at compile time).
    """

    def __init__(self, program_path: Path, model_path: Path, name: str | None = None):
        from onnx.helper import tensor_dtype_to_np_dtype

        from converter.export.kv_graph import graph_signature

        super().__init__(name=name, prefix="migraphx-runner")
        self.program_path = Path(program_path)
        inputs, outputs = graph_signature(model_path)
        self.dtypes = {v.name: np.dtype(tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)) for v in inputs}
        self.output_names = tuple(v.name for v in outputs)

    def activate_impl(self):
        import migraphx

        self.program = migraphx.load(str(self.program_path), format="msgpack")
        self.shapes = {name: tuple(shape.lens()) for name, shape in self.program.get_parameter_shapes().items()}
        unknown = sorted(set(self.shapes) - set(self.dtypes))
        if unknown:
            raise UserError(f"{self.program_path.name}: program inputs {unknown} are not inputs of the ONNX graph")

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name, lens in self.shapes.items():
            meta.add(name, self.dtypes[name], lens)
        return meta

    def infer_impl(self, feed_dict):
        import migraphx

        args = {}
        for name, lens in self.shapes.items():
            array = np.ascontiguousarray(feed_dict[name])
            if tuple(array.shape) != lens:
                raise UserError(f"{self.program_path.name}: input {name} has shape {tuple(array.shape)}, the program "
                                f"was compiled for {lens} (engine.batch.opt x engine.sequence.opt)")
            args[name] = migraphx.argument(array)
        start = time.perf_counter()
        outputs = self.program.run(args)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((n, np.array(o, copy=True)) for n, o in zip(self.output_names, outputs))

    def deactivate_impl(self):
        del self.program


_AMD_KFD = Path("/dev/kfd")


def _amd_device() -> str | None:
    return None if _AMD_KFD.exists() else "no AMD GPU (no ROCm kernel driver /dev/kfd)"


def build_migraphx(target: str, model_path: Path, work_dir: Path, plan: QuantPlan, engine: EngineOptions,
                   dry_run: bool = False) -> BuildReport:
    """Compile (or with `dry_run` only plan) the MIGraphX program.

    MIGraphX's instructions do not name the ONNX nodes they came from, so which linears run in int8
    is unknown: `fused_linears` and `unfused_linears` are None, and the report carries the compiled
    program's int8 instructions (`int8_dot_instructions`, `program_ops`) instead."""
    if dry_run:
        details = {**plan_build(target, model_path, engine), "engine_file": None, "dry_run": True}
        return BuildReport(target, "migraphx", {}, 0, [], details=details)
    details = build_program(target, model_path, engine)
    int8 = {"int8 dot instructions": details["int8_dot_instructions"]} if details["int8_dot_instructions"] else {}
    return BuildReport(target, "migraphx", int8, None, None, details=details)


def _migraphx_runner(model_path: Path, build: BuildReport):
    return MigraphxRunner(model_path.parent / build.details["engine_file"], model_path, name="int8-migraphx")


def target(name: str, ci_labels: tuple[str, ...]) -> Target:
    """The MIGraphX target `name` (its gfx arch from `MIGRAPHX_GPUS`), built on CI machines labelled
    `ci_labels`. Triton has no MIGraphX platform, and a program has one fixed input shape."""
    arch, gpu = MIGRAPHX_GPUS[name]
    return Target(name=name, backend="migraphx", hardware=f"{gpu} ({arch})", requires=(MIGRAPHX_MODULE,),
                  build=build_migraphx, runner=_migraphx_runner, gpu=True, preflight=_amd_device,
                  ci_labels=ci_labels, triton_refusal="Triton has no MIGraphX platform",
                  fixed_shape=FIXED_SHAPE)
