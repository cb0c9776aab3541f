"""TensorRT engines for NVIDIA data-center GPUs (A100: compute capability 8.0, H100: 9.0).

Written against the standard `tensorrt` Python API of TensorRT 10 and 11:
  * a strongly typed network parsed from the QDQ ONNX (precision comes from the Q/DQ nodes, not
    from builder flags; TensorRT 11 removed the weak-typing flags, 10 accepts the creation flag);
  * one optimization profile from the recipe's batch and sequence ranges;
  * workspace limit, builder optimization level, optional hardware / version compatibility;
  * a timing cache saved beside the engine and reused by the next build of the same artifact;
  * an engine file named `model.<target>.sm<cc>.trt<version>.plan`;
  * the engine inspector's per-layer precisions in the build report.
The same network/config code also drives the TensorRT-RTX builder on CPU (`converter.targets.tensorrt_rtx`),
which is how the parser and QDQ optimizer are exercised on machines without a GPU.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from converter.errors import UserError
from converter.export.qdq_names import WEIGHT_DQ_SUFFIX, linears_of
from converter.progress import note
from converter.targets.base import BuildReport, Target
from converter.targets.engine_options import EngineOptions

if TYPE_CHECKING:  # annotations only: a target does not depend on the quantization stage
    from converter.quant.quantize import QuantPlan

TENSORRT_MODULE = "tensorrt"
PROFILE_AXES = ("batch", "sequence")  # dimension order of input_ids / attention_mask


@dataclass(frozen=True)
class GpuSpec:
    """The hardware a TensorRT target builds for."""

    compute_capability: str  # "8.0"
    gpu: str

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")


TENSORRT_GPUS = {
    "a100-tensorrt": GpuSpec("8.0", "NVIDIA A100"),
    "h100-tensorrt": GpuSpec("9.0", "NVIDIA H100"),
}


def engine_file_name(target: str, spec: GpuSpec, tensorrt_version: str) -> str:
    """`model.<target>.sm<cc>.trt<version>.plan`: an engine runs only where all three match."""
    return f"model.{target}.{spec.sm}.trt{tensorrt_version}.plan"


def timing_cache_name(engine_file: str) -> str:
    return engine_file.removesuffix(".plan") + ".timing.cache"


def installed_tensorrt_version() -> str | None:
    """Version of the importable `tensorrt` package, without importing it (None if absent)."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12", "tensorrt_cu13"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _axis_ranges(name: str, rank: int, options: EngineOptions, kv_graph: bool) -> list:
    """The recipe range of each axis of one input (None: the axis is expected to be static)."""
    from converter.export.kv_graph import PAST_PREFIX
    from converter.targets.engine_options import DimRange

    if name.startswith(f"{PAST_PREFIX}."):  # (batch, kv_heads, past_sequence, head_dim)
        return [options.batch, None, options.past_sequence, None][:rank]
    if name == "attention_mask" and kv_graph:  # covers the cached and the current tokens
        s, p = options.sequence, options.past_sequence
        return [options.batch, DimRange(min=s.min + p.min, opt=s.opt + p.opt, max=s.max + p.max)][:rank]
    return [getattr(options, axis) for axis in PROFILE_AXES][:rank] + [None] * max(0, rank - len(PROFILE_AXES))


def profile_shapes(model_path: Path, options: EngineOptions) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes per graph input: recipe ranges on dynamic axes, exported sizes on static ones.

    Raises:
        UserError: a dynamic axis beyond (batch, sequence, past_sequence) has no range in the recipe.
    """
    from converter.export.kv_graph import PAST_PREFIX, graph_signature

    inputs = graph_signature(model_path)[0]
    kv_graph = any(v.name.startswith(f"{PAST_PREFIX}.") for v in inputs)
    shapes = {}
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        ranges = _axis_ranges(value.name, len(dims), options, kv_graph)
        per_axis = []  # (min, opt, max) per axis
        for axis, (dim, rng) in enumerate(zip(dims, ranges)):
            if dim.HasField("dim_value"):
                per_axis.append((dim.dim_value,) * 3)
            elif rng is None:
                raise UserError(f"input {value.name}: dynamic axis {axis} has no range in the recipe's engine section")
            else:
                per_axis.append((rng.min, rng.opt, rng.max))
        shapes[value.name] = {key: [a[i] for a in per_axis] for i, key in enumerate(("min", "opt", "max"))}
    return shapes


def plan_build(target: str, model_path: Path, options: EngineOptions, tensorrt_version: str | None) -> dict:
    """The exact build a TensorRT target performs: what `--dry-run` prints and records.

    Raises:
        UserError: the recipe pins a TensorRT version other than the installed one.
    """
    spec = TENSORRT_GPUS[target]
    if options.tensorrt_version and tensorrt_version and options.tensorrt_version != tensorrt_version:
        raise UserError(f"target {target}: recipe engine.tensorrt_version is {options.tensorrt_version}, "
                        f"installed TensorRT is {tensorrt_version}")
    version = tensorrt_version or options.tensorrt_version
    engine = engine_file_name(target, spec, version or "-unknown")  # dry run without TensorRT nor a pinned version
    return {
        "backend": "tensorrt",
        "gpu": spec.gpu,
        "compute_capability": spec.compute_capability,
        "gfx_arch": None,
        "tensorrt_version": version,
        "network_definition": "strongly_typed",
        "profiles": [profile_shapes(model_path, options)],
        "workspace_bytes": options.workspace_mb * 1024 * 1024,
        "builder_optimization_level": options.builder_optimization_level,
        "hardware_compatibility": options.hardware_compatibility,
        "version_compatible": options.version_compatible,
        "profiling_verbosity": "detailed",
        "planned_engine_file": engine,
        "timing_cache_file": timing_cache_name(engine),
    }


class TensorRTParseError(RuntimeError):
    """The ONNX parser refused the graph; the message names every failing node."""


def parse_network(trt, builder, logger, model_path: Path):
    """Strongly typed network from the ONNX file (external data is read from beside it).

    Returns:
        (network, parser): the parser must outlive the network's use (it owns the weights).

    Raises:
        TensorRTParseError: with one entry per parser error, naming the node.
    """
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            errors.append(f"node {err.node_name() or err.node()} ({err.node_operator()}): {err.desc()}")
        raise TensorRTParseError(f"{model_path.name}: TensorRT ONNX parser failed: {'; '.join(errors)}")
    return network, parser


def network_int8_summary(trt, network) -> dict:
    """Count the network's INT8 layers as parsed: quantize layers producing INT8, and matrix
    multiplies whose two inputs are dequantized from INT8 (what the QDQ optimizer fuses into int8 GEMMs).
    """
    producers = {}
    types = collections.Counter()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        types[layer.type.name] += 1
        for j in range(layer.num_outputs):
            producers[layer.get_output(j).name] = layer

    def int8_dequantize(tensor):
        layer = producers.get(tensor.name)
        # the parser broadcasts a 2-D weight to the activation's rank with a SHUFFLE after its DQ
        while layer is not None and layer.type == trt.LayerType.SHUFFLE:
            layer = producers.get(layer.get_input(0).name)
        ok = layer is not None and layer.type == trt.LayerType.DEQUANTIZE and layer.get_input(0).dtype == trt.int8
        return layer if ok else None

    int8_quantize = 0
    int8_matmuls = []  # MatMul names, from their weight DQ layers: `<matmul>/weight_dequantize` (converter.export.qdq_names)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.QUANTIZE and layer.get_output(0).dtype == trt.int8:
            int8_quantize += 1
        elif layer.type == trt.LayerType.MATRIX_MULTIPLY:
            a, b = int8_dequantize(layer.get_input(0)), int8_dequantize(layer.get_input(1))
            if a is not None and b is not None:
                int8_matmuls.append(b.name.removesuffix(WEIGHT_DQ_SUFFIX))
    return {"layers": network.num_layers, "int8_quantize_layers": int8_quantize,
            "int8_matmul_layers": len(int8_matmuls),
            "int8_matmul_linears": [linear for name in int8_matmuls for linear in linears_of(name)],
            "layer_types": dict(sorted(types.items()))}


def make_config(trt, builder, plan: dict, timing_cache: bytes = b""):
    """Builder config for `plan`: profile, workspace, optimization level, compatibility, timing cache.

    Returns:
        (config, cache): the ITimingCache attached to the config (serialize it after the build).
    """
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan["workspace_bytes"])
    config.builder_optimization_level = plan["builder_optimization_level"]
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector's per-layer precisions
    for shapes in plan["profiles"]:
        profile = builder.create_optimization_profile()
        for name, s in shapes.items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    if plan["hardware_compatibility"] != "none":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, plan["hardware_compatibility"].upper())
    if plan["version_compatible"]:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config, cache


def engine_layer_precisions(inspector_json: str) -> dict:
    """Per-layer precisions from the engine inspector's JSON (TensorRT 10 `Format/Datatype` strings,
    TensorRT 11 separate `DataType`). A layer's precision is its first input's type, as TREx counts it.
    """
    info = json.loads(inspector_json)
    layers = [layer for layer in info.get("Layers", []) if isinstance(layer, dict)]

    def dtype(tensor: dict) -> str:
        text = tensor.get("DataType") or tensor.get("Format/Datatype") or tensor.get("Format/DataType") or "unknown"
        lowered = text.lower()
        for name in ("int8", "fp8", "int4", "half", "fp16", "bfloat16", "float", "fp32", "int32", "int64", "bool"):
            if name in lowered:
                return {"half": "fp16", "float": "fp32", "bfloat16": "bf16"}.get(name, name)
        return lowered

    precisions = collections.Counter()
    int8 = []
    for layer in layers:
        tensors = layer.get("Inputs", []) + layer.get("Outputs", [])
        precisions[dtype(layer["Inputs"][0]) if layer.get("Inputs") else "none"] += 1
        if any(dtype(t) == "int8" for t in tensors):
            int8.append(layer.get("Name", "?"))
    return {"engine_layers": len(layers), "int8_layers": len(int8), "layer_precisions": dict(precisions),
            "int8_layer_names": int8[:50]}


def device_compute_capability() -> str | None:
    """Compute capability of CUDA device 0 ("9.0"), through the CUDA runtime; None without a GPU."""
    import ctypes

    try:
        from polygraphy import cuda

        handle = cuda.wrapper().handle
        major, minor = ctypes.c_int(), ctypes.c_int()
        # cudaDevAttrComputeCapabilityMajor = 75, ...Minor = 76
        if handle.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0) or handle.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0):
            return None
        return f"{major.value}.{minor.value}"
    except Exception:  # no CUDA runtime library or no device: the caller reports what is missing
        return None


def check_device(target: str, plan: dict) -> None:
    """An engine without hardware compatibility runs only on its compute capability: refuse to build
    an H100 engine on an A100 (it would build fine and then never load on the H100).

    Raises:
        UserError: no CUDA GPU, or one of another compute capability without hardware compatibility.
    """
    current = device_compute_capability()
    if current is None:
        raise UserError(f"target {target}: no CUDA GPU visible (needs compute capability {plan['compute_capability']})")
    if current != plan["compute_capability"] and plan["hardware_compatibility"] == "none":
        raise UserError(f"target {target}: this GPU has compute capability {current}, the target needs "
                        f"{plan['compute_capability']}; build on that GPU or set engine.hardware_compatibility")


def _previous_timing_cache(engine_dir: Path, cache_file: str) -> Path | None:
    """The newest same-named cache of an earlier version of this artifact (`<name>/<version>/`)."""
    candidates = [p for p in engine_dir.parent.glob(f"*/{cache_file}") if not p.parent.name.startswith((".", "_"))]
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def build_engine(target: str, model_path: Path, options: EngineOptions) -> dict:
    """Build, save and inspect the TensorRT engine for `target` beside `model_path`.

    Returns:
        The build plan plus `engine_file`, timing-cache reuse, parsed-network INT8 counts and the
        engine inspector's per-layer precisions.

    Raises:
        UserError: wrong or missing GPU, or a TensorRT version other than the recipe's.
        TensorRTParseError / RuntimeError: TensorRT refused the graph or the build failed.
    """
    import tensorrt as trt

    plan = plan_build(target, model_path, options, trt.__version__)
    check_device(target, plan)
    out_dir = model_path.parent
    previous = _previous_timing_cache(out_dir, plan["timing_cache_file"])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, parser = parse_network(trt, builder, logger, model_path)
    parsed = network_int8_summary(trt, network)  # while the parser, which owns the weights, is alive
    config, cache = make_config(trt, builder, plan, previous.read_bytes() if previous else b"")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"target {target}: TensorRT build_serialized_network failed (see the TensorRT log above)")
    seconds = time.perf_counter() - start
    (out_dir / plan["planned_engine_file"]).write_bytes(serialized)
    (out_dir / plan["timing_cache_file"]).write_bytes(cache.serialize())
    runtime = trt.Runtime(logger)
    runtime.engine_host_code_allowed = plan["version_compatible"]  # version-compatible plans embed a lean runtime
    engine = runtime.deserialize_cuda_engine(serialized)
    inspector = engine.create_engine_inspector()
    note(f"  {target}: engine {plan['planned_engine_file']} built in {seconds:.1f} s")
    del network, parser  # the network first: it borrows the parser's weights
    return {**plan, "engine_file": plan["planned_engine_file"], "build_seconds": round(seconds, 2),
            "timing_cache_reused": previous is not None, "network": parsed,
            **engine_layer_precisions(inspector.get_engine_information(trt.LayerInformationFormat.JSON))}


def tensorrt_runner(engine_path: Path, version_compatible: bool = False, name: str = "int8-tensorrt"):
    """Polygraphy's TensorRT runner over a saved engine: the same runner interface as ONNX Runtime's."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    def runtime():
        import tensorrt as trt

        rt = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        rt.engine_host_code_allowed = version_compatible
        return rt

    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)), runtime=runtime), name=name)


_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def _nvidia_device() -> str | None:
    present = _NVIDIA_GPUS.is_dir() and any(_NVIDIA_GPUS.iterdir())
    return None if present else "no NVIDIA GPU (no NVIDIA driver device found)"


def build_tensorrt(target: str, model_path: Path, work_dir: Path, plan: QuantPlan, engine: EngineOptions,
                   dry_run: bool = False) -> BuildReport:
    """Build (or with `dry_run` only plan) the TensorRT engine; INT8 coverage from the parsed network."""
    if dry_run:
        details = {**plan_build(target, model_path, engine, installed_tensorrt_version()),
                   "engine_file": None, "dry_run": True}
        return BuildReport(target, "tensorrt", {}, 0, [], details=details)
    details = build_engine(target, model_path, engine)
    fused = set(details.get("network", {}).get("int8_matmul_linears", []))
    return BuildReport(target, "tensorrt", {"int8_layers": details["int8_layers"]}, len(fused & set(plan.linears)),
                       [n for n in plan.linears if n not in fused], details=details)


def _tensorrt_target_runner(model_path: Path, build: BuildReport):
    return tensorrt_runner(model_path.parent / build.details["engine_file"], build.details["version_compatible"])


def target(name: str, ci_labels: tuple[str, ...]) -> Target:
    """The TensorRT target `name` (its GPU from `TENSORRT_GPUS`), built on CI machines labelled
    `ci_labels`: an engine is tied to its compute capability, so the label names the exact GPU."""
    spec = TENSORRT_GPUS[name]
    return Target(name=name, backend="tensorrt", hardware=f"{spec.gpu} (compute capability {spec.compute_capability})",
                  requires=(TENSORRT_MODULE,), build=build_tensorrt, runner=_tensorrt_target_runner, gpu=True,
                  preflight=_nvidia_device, ci_labels=ci_labels, triton_platform="tensorrt_plan",
                  triton_kind="KIND_GPU", strict_qdq=True)
