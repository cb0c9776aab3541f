"""The conversion, stage by stage. The order is written down once, here:

    load -> calibrate -> smooth -> quantize -> export -> check -> build -> parity -> package

*calibrate* measures the original model; *smooth* (after an optional alpha search) folds SmoothQuant
scales into it; *quantize* re-calibrates the smoothed model for the static activation scales, picks
each range and (optionally) sends the most sensitive linears back to float. Parity compares against
the original checkpoint reloaded from disk, so nothing that smoothing did in place can leak into the
reference. calibrate .. export and parity are served from the stage cache when their inputs match.
"""

from __future__ import annotations

import gc
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from converter import scratch
from converter import stage_cache as cache
from converter.artifact import package
from converter.artifact import triton
from converter.artifact.layer_report import activation_errors, channel_plot_data, layer_rows, write_report
from converter.errors import ParityFailure, UserError
from converter.export import kv_graph
from converter.export.exporter import export_fp32, insert_qdq
from converter.models.archs import arch_spec, block_linear_names, check_spec, spec_from_recipe
from converter.models.io import ModelIO, checkpoint_io
from converter.models.load import TOKENIZER_FILES, LoadedModel, check_context, check_token_ids, load
from converter.models.text import Windows, token_windows, window_wrap
from converter.parity.evalsets import EvalInputs, load_eval_inputs, measure_parity, report_warnings, set_label
from converter.progress import note, warn
from converter.quant.alpha_search import choose_alphas
from converter.quant.calibrate import activation_ranges, collect_input_amax
from converter.quant.quantize import check_patterns, plan_quantization, split_by_exclusions
from converter.quant.sensitivity import sensitivity_fallback, without
from converter.quant.smooth import smooth
from converter.recipe import LoadedRecipe
from converter.targets.checks import check_targets_buildable, dry_run_parity, tensorrt_checks
from converter.targets.registry import TARGETS

STAGES = ("load", "calibrate", "smooth", "quantize", "export", "check", "build", "parity", "package")
FRONT_STAGES = ("calibrate", "smooth", "quantize", "export")
MODEL_FILE = "model.onnx"
MODEL_FORMATS = {"O3": "onnx-qdq-w8a8", "O2": "onnx-dynamic-w8a8-per-tensor", "O1": "onnx-dynamic-w8a8-per-token"}
REPORT_FILES = ("parity_report.json", "parity_report.md", package.MANIFEST, "report")


@dataclass
class StageRecord:
    name: str
    seconds: float
    ran: bool = True
    cache: str | None = None  # "hit": served from the stage cache; "miss": computed and stored
    peak_rss_mb: float | None = None  # process peak so far, at the end of the stage


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
        record.peak_rss_mb = round(peak_rss_mb(), 1)
        self.records.append(record)


def _windows_line(windows, data) -> str:
    """"29 windows x 256 tokens (num_samples 32: the text holds 29)"."""
    line = f"{len(windows.input_ids)} windows x {data.seq_len} tokens"
    return line + (f" (num_samples {data.num_samples}: the text holds {windows.total_windows})"
                   if data.num_samples > windows.total_windows else "")


def _shortfall(field: str, asked: int, got: int, source: str) -> str:
    """" (parity.generation.prompts 8: there are 4 evaluation windows)" when a run gets fewer than the
    recipe asks for, else ""."""
    return f" ({field} {asked}: there are {got} {source})" if got < asked else ""


def artifact_version(recipe_version: str, build_number: int | None) -> str:
    """`<output.version>-build<N>` with a build number, else the recipe's version."""
    return recipe_version if build_number is None else f"{recipe_version}-build{build_number}"


def convert(recipe: LoadedRecipe, output_dir: Path, force: bool = False, dry_run: bool = False,
            build_number: int | None = None, cache_dir: Path | None = None) -> RunResult:
    """Run every stage for `recipe` and publish `output_dir/<name>/<version>/`.

    Args:
        dry_run: GPU targets record their exact build plan instead of building (no GPU needed).
        build_number: CI build number: the artifact version becomes `<output.version>-build<N>` and
            the Triton version folder `<N>`.
        cache_dir: stage cache folder (see converter/stage_cache.py); None computes everything.

    Raises:
        UserError: bad recipe contents, data or checkpoint, or a target that cannot build here
            (nothing is published).
        ParityFailure: thresholds missed; reports go to `<name>/_rejected/<version>/`.
    """
    r = recipe.recipe
    version = artifact_version(r.output.version, build_number)
    final = package.artifact_dir(output_dir, r.output.name, version)
    package.check_publishable(final, force)
    check_targets_buildable(r.targets, dry_run)
    stages = _Stages()
    with scratch.folder(final.parent, package.staging_prefix(final), mode=0o755) as staging, \
            scratch.folder(Path(tempfile.gettempdir()), "convert-work-") as work:
        build_info = {"recipe_version": r.output.version, "number": build_number,
                      "triton_version": build_number or triton.triton_version({"version": r.output.version})}
        manifest = _run_stages(recipe, stages, staging, work, cache.StageCache(cache_dir), version, build_info,
                               dry_run)
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


@dataclass
class _Inputs:
    """What the load stage hands on: the model, its I/O, the token windows and the stage-cache keys."""

    loaded: LoadedModel
    io: ModelIO
    calib: Windows
    texts: EvalInputs
    keys: cache.StageKeys


def _run_stages(recipe: LoadedRecipe, stages: _Stages, staging: Path, work: Path, store: cache.StageCache,
                version: str, build_info: dict, dry_run: bool) -> dict:
    r = recipe.recipe
    torch.manual_seed(0)
    with stages.run("load"):
        inputs = _load_inputs(recipe, dry_run)
    loaded = inputs.loaded
    fp32_path = work / "model.fp32.onnx"
    exported = cache.load_export(store, inputs.keys.export, staging / MODEL_FILE, fp32_path)
    if exported is not None:  # the model files are cached: calibrate .. export all come from the cache
        qdq, plan, front = exported
        stages.records += [StageRecord(s, 0.0, ran=False, cache="hit") for s in FRONT_STAGES]
    else:
        qdq, plan, front = _front(recipe, stages, store, inputs.keys, loaded.model, inputs.calib,
                                  inputs.texts.selection or inputs.calib, staging, fp32_path)
    if front["fallback"] and not front["fallback"]["target_met"]:  # also on a cache hit: the run should say it
        outcome = package.fallback_outcome(front["fallback"], r.quantization.fallback.model_dump())
        warn(f"quantization.fallback: {outcome} (parity's thresholds still decide publishing)")
    del loaded.model
    gc.collect()
    model_sha256 = cache.model_sha256(qdq.path)  # keys the check and every target's parity
    checks = _check(recipe, stages, store, qdq.path, model_sha256)
    targets = {name: _target(recipe, name, stages, store, loaded, inputs.io, qdq, model_sha256, plan, fp32_path,
                             inputs.texts, work, dry_run)
               for name in r.targets}
    _write_files(recipe, staging, loaded.path, version, targets, front)
    manifest = package.new_manifest(
        name=r.output.name, version=version, build=build_info, model=_model_entry(r, inputs.io, qdq, plan),
        source={"path": r.source.path, "architecture": loaded.architecture,
                "sha256": loaded.checkpoint_sha256, "files": loaded.files},
        data=_data_entries(r, inputs.calib, inputs.texts, front), front=front, targets=targets, checks=checks,
        peak_rss_mb=round(peak_rss_mb(), 1), recipe=recipe)
    if not manifest["parity_passed"]:
        manifest["stages"] = [s.__dict__ for s in stages.records]
        package.write_manifest(staging, manifest)
    return manifest


def _load_inputs(recipe: LoadedRecipe, dry_run: bool) -> _Inputs:
    """The load stage: the checkpoint, its token windows and prompts, each checked before any work."""
    r = recipe.recipe
    loaded = load(recipe)
    io = checkpoint_io(loaded.path, spec_from_recipe(r.architecture))
    wrap = window_wrap(loaded.tokenizer, io.kind)
    calib = token_windows(recipe, r.calibration, loaded.tokenizer, shuffle=True, wrap=wrap)
    if r.export.kv_cache and io.kind == "decoder":  # the graph also runs decode steps: calibrate them too
        calib = calib.with_decode(r.calibration.decode_windows, r.calibration.decode_steps)
    texts = load_eval_inputs(recipe, loaded.tokenizer, wrap, io.kind == "decoder")
    prompts = [p for set_prompts in texts.prompts for p in set_prompts]
    _refuse_fixed_shape_generation(r.targets, bool(prompts), dry_run)
    _check_lengths_and_ids(recipe, loaded, io, calib, texts, prompts)
    note(_load_line(recipe, loaded, calib, texts, prompts))
    keys = cache.stage_keys(recipe, loaded.checkpoint_sha256, calib.sha256,
                            texts.selection.sha256 if texts.selection else None)
    return _Inputs(loaded, io, calib, texts, keys)


def _check_lengths_and_ids(recipe: LoadedRecipe, loaded, io, calib, texts, prompts: list[list[int]]) -> None:
    """Before any work: a window or prompt longer than the model's context, a token id beyond its
    vocabulary or an attention the fused kernel cannot take fails here, not after minutes of
    calibration (or as an index error deep in a stage)."""
    r = recipe.recipe
    lengths = {"calibration.seq_len": r.calibration.seq_len,
               **{f"{set_label(recipe, s.name)}.seq_len": s.seq_len for s in r.parity.sets},
               **({"selection.seq_len": r.selection.seq_len} if r.selection else {})}
    if prompts:
        lengths["the longest generation prompt plus parity.generation.max_new_tokens"] = (
            max(map(len, prompts)) + r.parity.generation.max_new_tokens)
    check_context(loaded.model.config, lengths)
    if r.export.attention == "onnxruntime" and io.kind == "decoder":
        from converter.export.ort_fusion import check_fusable

        check_fusable(loaded.model)
    check_token_ids(loaded.model, {"calibration data": int(calib.input_ids.max()),
                                   "evaluation data": max(int(w.input_ids.max()) for w in texts.windows),
                                   "selection data": int(texts.selection.input_ids.max()) if texts.selection
                                   else -1,
                                   "generation prompts": max((max(p) for p in prompts), default=-1)})


def _load_line(recipe: LoadedRecipe, loaded, calib, texts, prompts: list[list[int]]) -> str:
    """The load stage's one line: the architecture, and how many windows and prompts each part got."""
    r = recipe.recipe
    return (f"  {loaded.architecture}: calibration {_windows_line(calib, r.calibration)}"
            + (f" + {calib.decode_windows} x {calib.decode_steps} decode steps" if calib.decode_windows else "")
            + _shortfall("calibration.decode_windows", r.calibration.decode_windows, calib.decode_windows,
                         "calibration windows")
            + "; evaluation " + ", ".join((f"{s.name} " if r.parity.named_sets else "") + _windows_line(w, s)
                                          for s, w in zip(r.parity.sets, texts.windows))
            + (f"; selection {_windows_line(texts.selection, r.selection)}" if texts.selection else "")
            + (f"; {len(prompts)} generation prompts" if prompts else "")
            + (_shortfall("parity.generation.prompts", r.parity.generation.prompts, len(prompts),
                          "prompts in the file" if r.parity.generation.prompts_file else "evaluation windows")
               if prompts else ""))


def _check(recipe: LoadedRecipe, stages: _Stages, store: cache.StageCache, model_path: Path,
           model_sha256: str) -> dict:
    """The check stage (QDQ lint + TensorRT acceptance), whatever the targets; after the model is
    freed (the builder needs memory). Static graphs only: dynamic activations are CPU-only."""
    r = recipe.recipe
    level = r.quantization.activations.level
    with stages.run("check") as record:
        if level != "O3":  # the recipe only allows targets that run ONNX Runtime's graph with dynamic activations
            record.ran = False
            return {"skipped": f"{level} dynamic activations: a CPU-only graph, no TensorRT rules apply"}
        strict = any(TARGETS[t].strict_qdq for t in r.targets)
        key = cache.check_key(r.engine.model_dump(mode="json"), strict, model_sha256)
        checks = cache.load_checks(store, key)
        record.ran, record.cache = checks is None, _cache_state(store, checks is not None)
        if checks is None:
            checks = tensorrt_checks(model_path, r.engine, strict=strict)
            cache.save_checks(store, key, checks)
        return checks


def _model_entry(r, io: ModelIO, qdq, plan) -> dict:
    """The manifest's `model`: the graph file, its format, I/O and what was quantized."""
    level = r.quantization.activations.level
    inputs, outputs = kv_graph.graph_io_names(qdq.path)
    return {"file": MODEL_FILE, "format": MODEL_FORMATS[level], "activation_quantization": level,
            "opset": r.export.opset, "kind": io.kind, "inputs": inputs, "outputs": outputs,
            "kv_cache": r.export.kv_cache and io.kind == "decoder",
            "external_data": qdq.external_data,
            "quantized_linears": len(plan.linears), "float_linears": plan.excluded,
            "embedding": plan.embedding.summary() if plan.embedding is not None else None}


def _data_entries(r, calib: Windows, texts: EvalInputs, front: dict) -> dict:
    """The manifest's `calibration`, `evaluation` and `selection`: which text, how many windows."""
    eval_windows = texts.windows[0]
    return {
        "calibration": {"sha256": calib.sha256, "windows": len(calib.input_ids),
                        "available_windows": calib.total_windows, "tokens": front["calibration_tokens"],
                        "decode_windows": calib.decode_windows, "decode_steps": calib.decode_steps,
                        "decode_tokens": calib.decode_windows * calib.decode_steps},
        "evaluation": {"sha256": eval_windows.sha256, "windows": len(eval_windows.input_ids),
                       "sets": [{"name": s.name, "files": s.files, "sha256": w.sha256, "windows": len(w.input_ids)}
                                for s, w in zip(r.parity.sets, texts.windows)]},
        "selection": ({"files": r.selection.files, "sha256": texts.selection.sha256,
                       "windows": len(texts.selection.input_ids)} if texts.selection else None),
    }


def _refuse_fixed_shape_generation(targets: list[str], generates: bool, dry_run: bool) -> None:
    """Before any work: generation parity re-runs a growing sequence, which a MIGraphX program (one
    fixed input shape) cannot take; without this the run would fail after calibration and export.
    A dry run plans GPU targets without running their parity, so it is not refused.

    Raises:
        UserError: a fixed-shape target (MIGraphX) with generation parity on a decoder.
    """
    fixed = [t for t in targets if TARGETS[t].fixed_shape]
    if generates and fixed and not dry_run:
        raise UserError(f"{', '.join(fixed)}: {TARGETS[fixed[0]].fixed_shape} and generation parity runs a growing "
                        "sequence; set parity.generation.enabled: false for such targets")


def _cache_state(store: cache.StageCache, hit: bool) -> str | None:
    return None if not store.enabled else "hit" if hit else "miss"


def _front(recipe, stages, store, keys, model, calib, select, staging, fp32_path):
    """calibrate -> smooth -> quantize -> export, each served from the stage cache when it can be.

    `select`: the windows the alpha search and the sensitivity fallback score (the selection text, or
    the calibration windows when the recipe has none).

    Returns:
        (QdqResult, QuantPlan, front record): the record holds everything the manifest and the
        per-layer report need (JSON), so a cached export restores them exactly.
    """
    r = recipe.recipe
    bs = r.calibration.batch_size
    spec = arch_spec(model, spec_from_recipe(r.architecture))
    check_spec(model, spec, "recipe architecture" if r.architecture else "architecture table")
    if spec.kind == "encoder" and (r.smoothing.search != "off" or r.quantization.fallback.enabled):
        raise UserError(f"{type(model).__name__} is an encoder: smoothing.search and quantization.fallback "
                        "score next-token KL and need a causal LM; set them to off/false")
    linears = block_linear_names(model, spec)
    q = r.quantization
    check_patterns(linears, {"quantization.exclude": q.exclude if "exclude" in q.model_fields_set else [],
                             "quantization.activations.range_overrides": list(q.activations.range_overrides)},
                   type(model).__name__)
    quantized, _ = split_by_exclusions(linears, q.exclude)
    with stages.run("calibrate") as record:
        before = cache.load_stats(store, "calibrate", keys.calibrate)
        record.ran, record.cache = before is None, _cache_state(store, before is not None)
        if before is None:
            before = collect_input_amax(model, quantized, calib, bs)
            cache.save_stats(store, "calibrate", keys.calibrate, before)
    with stages.run("smooth") as record:
        smoothed = cache.load_smoothed(store, keys.smooth, model)
        record.ran, record.cache = smoothed is None, _cache_state(store, smoothed is not None)
        if smoothed is None:
            cfg, alphas, search = choose_alphas(model, spec, r.smoothing, r.quantization, linears, quantized,
                                                before.amax, select, bs)
            smooth_report = smooth(model, before.amax, cfg, spec, alphas)
            smoothing = {**smooth_report.to_dict(), "search": search.to_dict() if search else None}
        else:
            smoothing, stats = smoothed  # stats: re-measured on the smoothed model
    with stages.run("quantize") as record:
        # the plan is computed here every time (ranges, fallback, per-layer errors); it is cached only
        # inside the export entry. A smooth hit only brings back the maxima re-measured after smoothing.
        record.cache = _cache_state(store, False)
        if smoothed is None:
            # smoothing changed the inputs: measure the model as exported
            stats = collect_input_amax(model, quantized, calib, bs, "re-calibrate") if smoothing["groups"] else before
            cache.save_smoothed(store, keys.smooth, model, smoothing, stats, fp32_path.parent)
        plan, front = _quantize(recipe, model, linears, before, stats, smoothing, calib, select)
    with stages.run("export") as record:
        record.cache = _cache_state(store, False)
        export_fp32(model, fp32_path, r.export, spec)
        qdq = insert_qdq(fp32_path, staging / MODEL_FILE, model, plan, r.export, r.embedding_layout)
        cache.save_export(store, keys.export, qdq, fp32_path, plan, front)
    return qdq, plan, front


def _quantize(recipe, model, linears, before, stats, smoothing: dict, calib, select):
    """Static ranges, the plan, optional sensitivity fallback, and the per-layer record."""
    r = recipe.recipe
    bs = r.calibration.batch_size
    ranges, methods = activation_ranges(model, stats, calib, bs, r.quantization.activations)
    plan = full_plan = plan_quantization(model, linears, ranges, r.quantization)
    fallback = None
    if r.quantization.fallback.enabled:
        fallback = sensitivity_fallback(model, plan, select, bs, r.quantization.fallback).to_dict()
        plan = without(plan, fallback["fallback"])
    act_errors = activation_errors(model, full_plan, calib, 2, bs)
    layers = layer_rows(linears, before, stats, plan, full_plan, smoothing, act_errors, fallback)
    front = {
        "smoothing": smoothing,
        "fallback": fallback,
        "quantization": {
            name: {**q.summary(), "range_method": methods[name], "act_absmax": stats.per_tensor(name)}
            for name, q in plan.linears.items()
        },
        "layers": layers,
        "channels": channel_plot_data(layers, before, stats),
        "calibration_tokens": before.tokens,
    }
    return plan, front


def _target(recipe, name, stages, store, loaded, io, qdq, model_sha256, plan, fp32_path, texts, work,
            dry_run) -> dict:
    """Build one target and measure its parity (served from the cache when nothing changed)."""
    target = TARGETS[name]
    r = recipe.recipe
    with stages.run("build"):
        build = target.build(name, qdq.path, work, plan, engine=r.engine, dry_run=dry_run)
        if build.unfused_linears:
            raise RuntimeError(f"{name}: {len(build.unfused_linears)} quantized linear(s) did not fuse "
                               f"into int8 kernels: {build.unfused_linears[:5]}")
    if target.gpu and dry_run:
        return {"build": build.to_dict(), "parity": dry_run_parity(name, build)}
    with stages.run("parity") as record:
        key = cache.parity_key(recipe, name, build.to_dict(), model_sha256,
                               loaded.checkpoint_sha256, texts.sha256, texts.prompts)
        report = cache.load_parity(store, key, recipe)
        record.ran, record.cache = report is None, _cache_state(store, report is not None)
        if report is None:
            candidate = target.runner(qdq.path, build)
            # a GPU engine takes at most its profile's batch; an ONNX Runtime session any
            report = measure_parity(recipe, loaded.path, io, texts, candidate, fp32_path,
                                    r.engine.batch.max if target.gpu else None)
            cache.save_parity(store, key, report)
    report_warnings(report, name)
    return {"build": build.to_dict(), "parity": report.to_dict()}


def _write_files(recipe, staging: Path, checkpoint: Path, version: str, targets: dict, front: dict) -> None:
    """Everything in the artifact besides the model and the manifest."""
    r = recipe.recipe
    for fname in TOKENIZER_FILES:
        if (checkpoint / fname).is_file():
            shutil.copy2(checkpoint / fname, staging / fname)
    (staging / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved_dict(), sort_keys=False))
    package.write_json(staging / "parity_report.json", {t: v["parity"] for t, v in targets.items()})
    (staging / "parity_report.md").write_text("\n".join(
        package.parity_markdown(r.output.name, version, v["parity"], v["build"]) if v["parity"]["passed"] is not None
        else f"# {t}: parity not run\n\n{v['parity']['skipped']}\n" for t, v in targets.items()
    ))
    write_report(staging, f"{r.output.name} {version}", front["layers"], front["channels"])
