"""The conversion, stage by stage. The order is written down once, here:

    load -> calibrate -> smooth -> quantize -> export -> build -> parity -> package

*calibrate* measures the original model; *quantize* re-calibrates the smoothed model for the static
activation scales. Parity compares against the original checkpoint reloaded from disk, so nothing
that smoothing did in place can leak into the reference.
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

from converter import cache, package, triton
from converter.archs import arch_spec, block_linear_names
from converter.calibrate import collect_input_amax
from converter.data import token_windows
from converter.errors import ParityFailure
from converter.export import INPUT_NAMES, OUTPUT_NAMES, export_fp32, insert_qdq
from converter.load import TOKENIZER_FILES, load, load_reference
from converter.parity import ParityReport, check_thresholds, comparator_checks, evaluate
from converter.progress import note
from converter.quantize import plan_quantization, split_by_exclusions
from converter.recipe import LoadedRecipe
from converter.runners import TorchRunner, onnxruntime_runner
from converter.smooth import smooth
from converter.targets import TARGETS

STAGES = ("load", "calibrate", "smooth", "quantize", "export", "build", "parity", "package")
MODEL_FILE = "model.onnx"
REPORT_FILES = ("parity_report.json", "parity_report.md", package.MANIFEST)


@dataclass
class StageRecord:
    name: str
    seconds: float
    ran: bool = True
    cache: str | None = None  # "hit": served from the stage cache; "miss": computed and stored


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
        record = StageRecord(name, 0.0)
        yield record
        record.seconds = round(time.perf_counter() - start, 3)
        self.records.append(record)


def artifact_version(recipe_version: str, build_number: int | None) -> str:
    """`<output.version>-build<N>` with a build number, else the recipe's version."""
    return recipe_version if build_number is None else f"{recipe_version}-build{build_number}"


def convert(recipe: LoadedRecipe, output_dir: Path, force: bool = False, build_number: int | None = None,
            cache_dir: Path | None = None) -> RunResult:
    """Run every stage for `recipe` and publish `output_dir/<name>/<version>/`.

    Args:
        build_number: CI build number: the artifact version becomes `<output.version>-build<N>` and
            the Triton version folder `<N>`.
        cache_dir: stage cache folder (see converter/cache.py); None computes everything.

    Raises:
        UserError: bad recipe contents, data or checkpoint (nothing is published).
        ParityFailure: thresholds missed; reports go to `<name>/_rejected/<version>/`.
    """
    r = recipe.recipe
    version = artifact_version(r.output.version, build_number)
    final = package.artifact_dir(output_dir, r.output.name, version)
    package.check_publishable(final, force)
    stages = _Stages()
    staging = package.staging_dir(final)
    work = Path(tempfile.mkdtemp(prefix="convert-work-"))
    try:
        build_info = {"recipe_version": r.output.version, "number": build_number,
                      "triton_version": build_number or triton.triton_version({"version": r.output.version})}
        manifest = _run_stages(recipe, stages, staging, work, cache.StageCache(cache_dir), version, build_info)
        if not manifest["parity_passed"]:
            failures = [f"{t}: {f}" for t, v in manifest["targets"].items() for f in v["parity"]["failures"]]
            rejected = package.reject(staging, final, REPORT_FILES)
            raise ParityFailure(failures, str(rejected))
        with stages.run("package"):
            if r.triton.enabled:
                manifest["triton"] = triton.write_artifact_repository(staging, manifest)
            manifest["stages"] = [s.__dict__ for s in stages.records]
            manifest = package.write_manifest(staging, manifest)
            package.publish(staging, final, force)
        note(f"published {final}")
        return RunResult(artifact_dir=final, passed=True, manifest=manifest, stages=stages.records)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _run_stages(recipe: LoadedRecipe, stages: _Stages, staging: Path, work: Path, store: cache.StageCache,
                version: str, build_info: dict) -> dict:
    r = recipe.recipe
    torch.manual_seed(0)
    with stages.run("load"):
        loaded = load(recipe)
        model = loaded.model
        spec = arch_spec(model)
        linears = block_linear_names(model, spec)
        quantized, _ = split_by_exclusions(linears, r.quantization.exclude)
        calib = token_windows(recipe, r.calibration, loaded.tokenizer, shuffle=True)
        keys = cache.stage_keys(recipe, loaded.checkpoint_sha256, calib.sha256)
    fp32_path = work / "model.fp32.onnx"
    exported = cache.load_export(store, keys.export, staging / MODEL_FILE, fp32_path)
    if exported is not None:  # the model files are cached: calibrate .. export all come from the cache
        qdq, plan, smooth_report, calibration_tokens = exported
        stages.records += [StageRecord(s, 0.0, ran=False, cache="hit") for s in ("calibrate", "smooth", "quantize", "export")]
    else:
        qdq, plan, smooth_report, calibration_tokens = _front(recipe, stages, store, keys, model, spec, linears,
                                                               quantized, calib, staging, work)
    del model, loaded.model
    gc.collect()
    eval_windows = token_windows(recipe, r.parity.eval, loaded.tokenizer, shuffle=False)
    targets = {}
    for name in r.targets:
        target = TARGETS[name]
        with stages.run("build"):
            build = target.build(name, qdq.path, work, plan)
            if build.unfused_linears:
                raise RuntimeError(f"{name}: {len(build.unfused_linears)} quantized linear(s) did not fuse "
                                   f"into int8 kernels: {build.unfused_linears[:5]}")
        with stages.run("parity") as record:
            key = cache.parity_key(recipe, name, build.to_dict(), package.sha256_file(qdq.path),
                                   loaded.checkpoint_sha256, eval_windows.sha256)
            report = cache.load_parity(store, key, recipe)
            record.ran, record.cache = report is None, _cache_state(store, report is not None)
            if report is None:
                report = _parity(recipe, loaded.path, eval_windows, target.runner(qdq.path), fp32_path)
                cache.save_parity(store, key, report)
        targets[name] = {"build": build.to_dict(), "parity": report.to_dict()}
    for fname in TOKENIZER_FILES:
        if (loaded.path / fname).is_file():
            shutil.copy2(loaded.path / fname, staging / fname)
    (staging / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved_dict(), sort_keys=False))
    reports = {t: v["parity"] for t, v in targets.items()}
    package.write_json(staging / "parity_report.json", reports)
    (staging / "parity_report.md").write_text("\n".join(
        package.parity_markdown(r.output.name, version, v["parity"], v["build"]) for v in targets.values()
    ))
    manifest = {
        "schema_version": 1,
        "name": r.output.name,
        "version": version,
        "build": build_info,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parity_passed": all(v["parity"]["passed"] for v in targets.values()),
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
                        "available_windows": calib.total_windows, "tokens": calibration_tokens},
        "evaluation": {"sha256": eval_windows.sha256, "windows": len(eval_windows.input_ids)},
        "smoothing": smooth_report.to_dict(),
        "quantization": {name: q.summary() for name, q in plan.linears.items()},
        "targets": targets,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "tools": package.tool_versions(),
        "recipe_sha256": recipe.digest(),
        "recipe": recipe.resolved_dict(),
    }
    if not manifest["parity_passed"]:
        manifest["stages"] = [s.__dict__ for s in stages.records]
        package.write_manifest(staging, manifest)
    return manifest


def _cache_state(store: cache.StageCache, hit: bool) -> str | None:
    return None if not store.enabled else "hit" if hit else "miss"


def _front(recipe, stages, store, keys, model, spec, linears, quantized, calib, staging, work):
    """calibrate -> smooth -> quantize -> export, each served from the stage cache when it can be.

    Returns:
        (QdqResult, QuantPlan, SmoothReport, calibration tokens).
    """
    r = recipe.recipe
    with stages.run("calibrate") as record:
        stats = cache.load_stats(store, "calibrate", keys.calibrate)
        record.ran, record.cache = stats is None, _cache_state(store, stats is not None)
        if stats is None:
            stats = collect_input_amax(model, quantized, calib, r.calibration.batch_size)
            cache.save_stats(store, "calibrate", keys.calibrate, stats)
    calibration_tokens = stats.tokens
    with stages.run("smooth") as record:
        smoothed = cache.load_smoothed(store, keys.smooth, model)
        record.ran, record.cache = smoothed is None, _cache_state(store, smoothed is not None)
        if smoothed is None:
            smooth_report = smooth(model, stats.amax, r.smoothing, spec)
        else:
            smooth_report, stats = smoothed  # stats: re-measured on the smoothed model
    with stages.run("quantize") as record:
        record.cache = _cache_state(store, smoothed is not None)
        if smoothed is None:
            if smooth_report.groups:  # smoothing changed the inputs: measure the model as exported
                stats = collect_input_amax(model, quantized, calib, r.calibration.batch_size, "re-calibrate")
            cache.save_smoothed(store, keys.smooth, model, smooth_report, stats, work)
        plan = plan_quantization(model, linears, stats, r.quantization)
    with stages.run("export") as record:
        record.cache = _cache_state(store, False)
        fp32_path = export_fp32(model, work / "model.fp32.onnx", r.export)
        qdq = insert_qdq(fp32_path, staging / MODEL_FILE, model, plan, r.export)
        cache.save_export(store, keys.export, qdq, fp32_path, plan, smooth_report, calibration_tokens)
    return qdq, plan, smooth_report, calibration_tokens


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
