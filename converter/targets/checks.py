"""Checks around the targets: can they build here, and does the artifact satisfy TensorRT?

Every QDQ artifact, whatever its targets, is linted against TensorRT's explicit-quantization rules
and (when the TensorRT-RTX packages are installed) parsed and built by TensorRT's ONNX parser and
builder on CPU; both outcomes go into the manifest under `checks`.
"""

from __future__ import annotations

from pathlib import Path

from converter.errors import UserError
from converter.export.qdq_names import EMBEDDING_SUFFIX
from converter.progress import note
from converter.targets.base import BuildReport
from converter.targets.engine_options import EngineOptions
from converter.targets.qdq_lint import lint_model
from converter.targets.registry import TARGETS


def check_targets_buildable(targets: list[str], dry_run: bool) -> None:
    """Refuse, before any work, a target this machine cannot build (GPU targets may dry-run).

    Raises:
        UserError: one line naming the target and everything it is missing.
    """
    for name in targets:
        target = TARGETS[name]
        ok, why = target.availability()
        if ok or (dry_run and target.gpu):
            continue
        hint = "; --dry-run records its build plan without building" if target.gpu else ""
        raise UserError(f"target {name} ({target.hardware}) cannot build on this machine: {why}{hint}")


def dry_run_parity(target: str, build: BuildReport) -> dict:
    """The parity entry of a GPU target that was only planned: not run, and not a failure."""
    engine = build.details.get("planned_engine_file")
    return {"passed": None, "failures": [],
            "skipped": f"--dry-run: {engine} was planned, not built; parity needs the {build.backend} engine on its GPU"}


def tensorrt_checks(model_path: Path, options: EngineOptions, strict: bool) -> dict:
    """QDQ lint plus the TensorRT-RTX parse + build of the artifact.

    Args:
        strict: a TensorRT target is selected, so a refusal is fatal rather than only recorded.

    Returns:
        {"qdq_lint": LintReport dict, "tensorrt_rtx": acceptance dict}.

    Raises:
        RuntimeError: the exporter wrote a graph TensorRT's rules reject (a bug, not user input),
            or, with `strict`, the TensorRT parser or builder refused it.
    """
    from converter.targets.tensorrt_rtx import accept

    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)  # the graph this converter just wrote
    lint = lint_model(proto, model_path.parent)
    if not lint.passed:
        raise RuntimeError(f"{model_path.name}: {lint.summary()}")
    domains = {n.domain for n in proto.graph.node} - {"", "ai.onnx"}
    int8_rows = any(n.op_type == "Gather" and n.input[0].endswith(EMBEDDING_SUFFIX) for n in proto.graph.node)
    if domains and not strict:  # export.attention: onnxruntime (the recipe allows it only without TensorRT)
        acceptance = {"passed": None, "skipped": f"the graph holds {', '.join(sorted(domains))} operators "
                      "(export.attention: onnxruntime) that only ONNX Runtime runs"}
    elif int8_rows and not strict:  # quantization.embedding: int8, laid out for ONNX Runtime
        acceptance = {"passed": None, "skipped": "the int8 embedding table is gathered by row, ONNX Runtime's "
                      "layout; TensorRT takes an int8 constant only as a DequantizeLinear input, which a recipe "
                      "with a TensorRT target gets instead"}
    else:
        acceptance = accept(model_path, options)
    if acceptance["passed"]:
        net = acceptance["network"]
        note(f"  TensorRT(-RTX) parser + builder accept {model_path.name}: {net['int8_matmul_layers']} int8 matmuls, "
             f"{net['int8_quantize_layers']} int8 quantize layers ({acceptance['seconds']:.1f} s)")
    elif acceptance["passed"] is False and strict:
        raise RuntimeError(f"{model_path.name}: TensorRT acceptance failed: {acceptance['error']}")
    return {"qdq_lint": lint.to_dict(), "tensorrt_rtx": acceptance}
