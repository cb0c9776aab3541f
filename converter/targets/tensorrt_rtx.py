"""TensorRT acceptance on a machine without a GPU, through the TensorRT-RTX packages.

`tensorrt-rtx-cu12-bindings` (imported as `tensorrt_rtx_bindings`) carries TensorRT's ONNX parser
and builder. Without a GPU its builder still runs ("legacy CPU-only mode"): the strongly typed
network is parsed, the QDQ graph optimizer runs and a serialized engine comes out. That proves the
artifact is acceptable to TensorRT's parser and builder. It does not run the engine (that needs a
GPU) and it is not the engine a server loads: TensorRT-RTX engines are a different product, and
its compute-capability list has no SM90, so the check builds for SM80 (A100).

The check runs in a child process: a native crash or the builder's memory cannot hurt the
conversion, and the child's own peak memory is reported.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from converter.targets.engine_options import EngineOptions
from converter.targets.tensorrt import make_config, network_int8_summary, parse_network, profile_shapes

RTX_MODULE = "tensorrt_rtx_bindings"
ACCEPTANCE_CC = "8.0"  # A100; TensorRT-RTX 1.x has no SM90 target


def rtx_available() -> bool:
    return importlib.util.find_spec(RTX_MODULE) is not None


def _accept_in_process(model_path: Path, options: EngineOptions) -> dict:
    import tensorrt_rtx_bindings as trt

    from converter.targets.tensorrt import TensorRTParseError

    result = {"tool": f"tensorrt-rtx {trt.__version__}", "compute_capability": ACCEPTANCE_CC,
              "parsed": False, "built": False}
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    start = time.perf_counter()
    try:
        network, parser = parse_network(trt, builder, logger, model_path)
    except TensorRTParseError as exc:
        return {**result, "error": str(exc)}
    result.update(parsed=True, parse_seconds=round(time.perf_counter() - start, 2), network=network_int8_summary(trt, network))
    # The CPU-only builder allocates host buffers for the profile's largest shapes: a 49k-vocabulary
    # lm_head at batch 8 x 2048 tokens asks for 4.5 GB. Acceptance only needs the parser and the QDQ
    # optimizer to take the graph, so it builds at the recipe's `opt` shapes; GPU engines keep the
    # full profile.
    full = profile_shapes(model_path, options)
    at_opt = {name: {"min": shape["opt"], "opt": shape["opt"], "max": shape["opt"]} for name, shape in full.items()}
    plan = {"workspace_bytes": options.workspace_mb * 1024 * 1024,
            "builder_optimization_level": options.builder_optimization_level,
            "profiles": [at_opt],
            "hardware_compatibility": "none", "version_compatible": False}
    config, _ = make_config(trt, builder, plan)
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM80, 0)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    result["build_seconds"] = round(time.perf_counter() - start, 2)
    if serialized is None:
        return {**result, "error": "build_serialized_network returned nothing (see the TensorRT log)"}
    del parser
    return {**result, "built": True, "engine_bytes": serialized.nbytes, "profiles": plan["profiles"]}


def accept(model_path: Path, options: EngineOptions, timeout_s: float = 600) -> dict:
    """Parse and build `model_path` with TensorRT-RTX in a child process.

    Returns:
        {"passed", "parsed", "built", "network": {..., "int8_matmul_layers"}, "error"?, ...};
        {"passed": None, "skipped": reason} when the packages are not installed.
    """
    if not rtx_available():
        return {"passed": None, "skipped": f"Python module {RTX_MODULE} not installed (pip install tensorrt-rtx-cu12-bindings)"}
    cmd = [sys.executable, "-m", "converter.targets.tensorrt_rtx", str(model_path), options.model_dump_json()]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"passed": False, "parsed": False, "built": False, "error": f"timed out after {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"passed": False, "parsed": False, "built": False, "error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(lines[-1])
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["passed"] = bool(result["parsed"] and result["built"])
    return result


def _own_peak_rss_mb() -> float | None:
    """This process's peak RSS (VmHWM). Not getrusage: Linux carries ru_maxrss across exec, so a child
    would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines() if Path("/proc/self/status").exists() else []:
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def main(argv: list[str]) -> int:
    """Child-process entry: `python -m converter.targets.tensorrt_rtx MODEL OPTIONS_JSON` -> one JSON line."""
    model_path, options = Path(argv[0]), EngineOptions.model_validate_json(argv[1])
    result = _accept_in_process(model_path, options)
    result["peak_rss_mb"] = _own_peak_rss_mb()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
