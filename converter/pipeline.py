"""The conversion, stage by stage. The order is written down once, here:

    load -> calibrate -> smooth -> quantize -> export -> check -> build -> parity -> package

*calibrate* measures the original model; *quantize* re-calibrates the smoothed model for the static
activation scales; *check* lints the QDQ graph against TensorRT's rules and has TensorRT's parser and
builder (TensorRT-RTX, on CPU) accept it. Parity compares against the original checkpoint reloaded
from disk, so nothing that smoothing did in place can leak into the reference.
"""

from __future__ import annotations

import gc
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from converter import package
from converter.archs import arch_spec, block_linear_names
from converter.calibrate import activation_ranges, collect_input_amax
from converter.data import token_windows
from converter.errors import ParityFailure
from converter.export import INPUT_NAMES, OUTPUT_NAMES, export_fp32, insert_qdq
from converter.load import TOKENIZER_FILES, load, load_reference
from converter.parity import ParityReport, check_thresholds, comparator_checks, evaluate
from converter.progress import note
from converter.quantize import plan_quantization, split_by_exclusions
from converter.recipe import LoadedRecipe
from converter.runners import TorchRunner, onnxruntime_runner
from converter.report import activation_errors, channel_plot_data, layer_rows, write_report
from converter.search import choose_alphas
from converter.sensitivity import sensitivity_fallback, without
from converter.smooth import smooth
from converter.target_checks import check_targets_buildable, dry_run_parity, tensorrt_checks
from converter.targets import TARGETS

STAGES = ("load", "calibrate", "smooth", "quantize", "export", "check", "build", "parity", "package")
MODEL_FILE = "model.onnx"
REPORT_FILES = ("parity_report.json", "parity_report.md", package.MANIFEST, "report")


@dataclass
class StageRecord:
    name: str
    seconds: float
    ran: bool = True


@dataclass
class RunResult:
    artifact_dir: Path
    passed: bool
    manifest: dict
    stages: list[StageRecord] = field(default_factory=list)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Stages:
    def __init__(self):
        self.records: list[StageRecord] = []

    @contextmanager
    def run(self, name: str):
        assert name in STAGES, name  # internal: a stage missing from the written-down order
        note(f"[bold]{name}[/bold]")
        start = time.perf_counter()
        yield
        self.records.append(StageRecord(name, round(time.perf_counter() - start, 3)))


def convert(recipe: LoadedRecipe, output_dir: Path, force: bool = False, dry_run: bool = False) -> RunResult:
    """Run every stage for `recipe` and publish `output_dir/<name>/<version>/`.

    Args:
        dry_run: GPU targets record their exact build plan instead of building (no GPU needed).

    Raises:
        UserError: bad recipe contents, data or checkpoint, or a target that cannot build here
            (nothing is published).
        ParityFailure: thresholds missed; reports go to `<name>/_rejected/<version>/`.
    """
    r = recipe.recipe
    final = package.artifact_dir(output_dir, r.output.name, r.output.version)
    package.check_publishable(final, force)
    check_targets_buildable(r.targets, dry_run)
    stages = _Stages()
    staging = package.staging_dir(final)
    work = Path(tempfile.mkdtemp(prefix="convert-work-"))
    try:
        manifest = _run_stages(recipe, stages, staging, work, dry_run)
        if not manifest["parity_passed"]:
            failures = [f"{t}: {f}" for t, v in manifest["targets"].items() for f in v["parity"]["failures"]]
            rejected = package.reject(staging, final, REPORT_FILES)
            raise ParityFailure(failures, str(rejected))
        with stages.run("package"):
            manifest["stages"] = [s.__dict__ for s in stages.records]
            manifest = package.write_manifest(staging, manifest)
            package.publish(staging, final, force)
        note(f"published {final}")
        return RunResult(artifact_dir=final, passed=True, manifest=manifest, stages=stages.records)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _run_stages(recipe: LoadedRecipe, stages: _Stages, staging: Path, work: Path, dry_run: bool = False) -> dict:
    r = recipe.recipe
    torch.manual_seed(0)
    with stages.run("load"):
        loaded = load(recipe)
        model = loaded.model
        spec = arch_spec(model)
        linears = block_linear_names(model, spec)
        quantized, _ = split_by_exclusions(linears, r.quantization.exclude)
    with stages.run("calibrate"):
        calib = token_windows(recipe, r.calibration, loaded.tokenizer, shuffle=True)
        stats = collect_input_amax(model, quantized, calib, r.calibration.batch_size)
    with stages.run("smooth"):
        bs = r.calibration.batch_size
        smoothing, alphas, search = choose_alphas(model, spec, r.smoothing, r.quantization, linears, quantized,
                                                  stats.amax, calib, bs)
        smooth_report = smooth(model, stats.amax, smoothing, spec, alphas)
    with stages.run("quantize"):
        before = stats
        if smooth_report.groups:  # smoothing changed the inputs: measure the model as exported
            stats = collect_input_amax(model, quantized, calib, r.calibration.batch_size, "re-calibrate")
        act = r.quantization.activations
        ranges, methods = activation_ranges(model, stats, calib, r.calibration.batch_size, act)
        plan = plan_quantization(model, linears, ranges, r.quantization)
        full_plan, fallback = plan, None
        if r.quantization.fallback.enabled:
            fallback = sensitivity_fallback(model, plan, calib, r.calibration.batch_size, r.quantization.fallback)
            plan = without(plan, fallback.fallback)
        act_errors = activation_errors(model, full_plan, calib, 2, r.calibration.batch_size)
        layers = layer_rows(linears, before, stats, plan, full_plan, smooth_report.to_dict(), act_errors,
                            fallback.to_dict() if fallback else None)
    with stages.run("export"):
        fp32_path = export_fp32(model, work / "model.fp32.onnx", r.export)
        qdq = insert_qdq(fp32_path, staging / MODEL_FILE, model, plan, r.export)
    del model, loaded.model
    gc.collect()
    with stages.run("check"):  # whatever the targets; after the model is freed (the builder needs memory)
        checks = tensorrt_checks(qdq.path, r.engine, strict=any(TARGETS[t].backend == "tensorrt" for t in r.targets))
    eval_windows = token_windows(recipe, r.parity.eval, loaded.tokenizer, shuffle=False)
    targets = {}
    for name in r.targets:
        target = TARGETS[name]
        with stages.run("build"):
            build = target.build(name, qdq.path, work, plan, engine=r.engine, dry_run=dry_run)
            if build.unfused_linears:
                raise RuntimeError(f"{name}: {len(build.unfused_linears)} quantized linear(s) did not fuse "
                                   f"into int8 kernels: {build.unfused_linears[:5]}")
        if target.gpu and dry_run:
            targets[name] = {"build": build.to_dict(), "parity": dry_run_parity(name, build)}
            continue
        with stages.run("parity"):
            report = _parity(recipe, loaded.path, eval_windows, target.runner(qdq.path, build), fp32_path)
        targets[name] = {"build": build.to_dict(), "parity": report.to_dict()}
    for fname in TOKENIZER_FILES:
        if (loaded.path / fname).is_file():
            shutil.copy2(loaded.path / fname, staging / fname)
    (staging / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved_dict(), sort_keys=False))
    write_report(staging, f"{r.output.name} {r.output.version}", layers, channel_plot_data(layers, before, stats))
    reports = {t: v["parity"] for t, v in targets.items()}
    package.write_json(staging / "parity_report.json", reports)
    (staging / "parity_report.md").write_text("\n".join(
        package.parity_markdown(r.output.name, r.output.version, v["parity"], v["build"]) if v["parity"]["passed"] is not None
        else f"# {t}: parity not run\n\n{v['parity']['skipped']}\n" for t, v in targets.items()
    ))
    manifest = {
        "schema_version": 1,
        "name": r.output.name,
        "version": r.output.version,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parity_passed": all(v["parity"]["passed"] is not False for v in targets.values()),
        "model": {
            "file": MODEL_FILE,
            "format": "onnx-qdq-w8a8",
            "opset": r.export.opset,
            "inputs": list(INPUT_NAMES),
            "outputs": list(OUTPUT_NAMES),
            "external_data": qdq.external_data,
            "quantized_linears": len(plan.linears),
            "float_linears": plan.excluded,
        },
        "source": {"path": r.source.path, "architecture": loaded.architecture,
                   "sha256": loaded.checkpoint_sha256, "files": loaded.files},
        "calibration": {"sha256": calib.sha256, "windows": len(calib.input_ids),
                        "available_windows": calib.total_windows, "tokens": stats.tokens},
        "evaluation": {"sha256": eval_windows.sha256, "windows": len(eval_windows.input_ids)},
        "smoothing": {**smooth_report.to_dict(), "search": search.to_dict() if search else None},
        "fallback": fallback.to_dict() if fallback else None,
        "layers": layers,
        "quantization": {
            name: {**q.summary(), "range_method": methods[name], "act_absmax": stats.per_tensor(name)}
            for name, q in plan.linears.items()
        },
        "targets": targets,
        "checks": checks,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "tools": package.tool_versions(),
        "recipe_sha256": recipe.digest(),
        "recipe": recipe.resolved_dict(),
    }
    if not manifest["parity_passed"]:
        manifest["stages"] = [s.__dict__ for s in stages.records]
        package.write_manifest(staging, manifest)
    return manifest


def _parity(recipe: LoadedRecipe, checkpoint: Path, windows, candidate, fp32_path: Path) -> ParityReport:
    r = recipe.recipe
    reference = TorchRunner(lambda: load_reference(checkpoint, r.source), name="fp32-pytorch")
    metrics = evaluate(reference, candidate, windows, r.parity.eval.batch_size)
    checks = comparator_checks(
        TorchRunner(lambda: load_reference(checkpoint, r.source), name="fp32-pytorch"),
        onnxruntime_runner(fp32_path, name="fp32-onnxruntime"),
        candidate,
        windows,
        r.parity.polygraphy,
    )
    thresholds = r.parity.thresholds
    return ParityReport(metrics=metrics, comparator=checks, thresholds=thresholds.model_dump(),
                        failures=check_thresholds(metrics, checks, thresholds))
