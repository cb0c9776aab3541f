"""Stage *package*: versioned artifact folders that appear complete or not at all.

Everything is written into a hidden staging folder beside the destination and renamed into place
only when complete, so a consumer polling `artifacts/<name>/<version>/` never sees a half-written
artifact. An existing version is replaced only with `force`.
"""

from __future__ import annotations

import json
import platform
import shutil
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from converter import scratch
from converter.errors import UserError, check_writable_folder
from converter.models.load import sha256_file

MANIFEST = "manifest.json"
REJECTED = "_rejected"  # reports of runs that failed parity: readable, never picked up as versions
_LIBRARIES = ("torch", "transformers", "onnx", "onnx-ir", "onnxruntime", "polygraphy", "safetensors", "pydantic", "numpy")
_LIBRARIES += ("tritonclient", "protobuf")  # they write and check the Triton configs
_LIBRARIES += ("tensorrt-rtx-cu12-bindings",)  # TensorRT's parser and builder in the check stage


def tool_versions() -> dict[str, str]:
    from converter import __version__

    versions = {"converter": __version__, "python": platform.python_version()}
    for lib in _LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = "not installed"
    return versions


def artifact_dir(output_dir: Path, name: str, version: str) -> Path:
    return output_dir / name / version


def check_publishable(final_dir: Path, force: bool) -> None:
    """Fail early, before any work, if publishing would overwrite a version without `force` or could
    not write the folder at all."""
    check_writable_folder(final_dir, "artifact folder")
    if final_dir.exists() and not force:
        raise UserError(f"artifact {final_dir} already exists; bump output.version or pass --force")


def staging_prefix(final_dir: Path) -> str:
    """Name prefix of the hidden folders a version is staged in, beside it (see converter/scratch.py)."""
    return f".staging-{final_dir.name}-"


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the manifest itself (relative POSIX paths)."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, scratch.LOCK)
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def new_manifest(*, name: str, version: str, build: dict, model: dict, source: dict, data: dict, front: dict,
                 targets: dict, checks: dict, peak_rss_mb: float, recipe) -> dict:
    """The manifest's fields, in the order it is written (`stages` and `files` are added when written).

    Args:
        data: `calibration`, `evaluation` and `selection` entries.
        front: the front stages' record: `smoothing`, `fallback`, `quantization` and `layers` are copied.
        recipe: the `LoadedRecipe`, written resolved with its digest.
    """
    return {
        "schema_version": 1,
        "name": name,
        "version": version,
        "build": build,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parity_passed": all(v["parity"]["passed"] is not False for v in targets.values()),
        "model": model,
        "source": source,
        **{k: data[k] for k in ("calibration", "evaluation", "selection")},
        **{k: front[k] for k in ("smoothing", "fallback", "quantization", "layers")},
        "targets": targets,
        "checks": checks,
        "peak_rss_mb": peak_rss_mb,
        "tools": tool_versions(),
        "recipe_sha256": recipe.digest(),
        "recipe": recipe.resolved_dict(),
    }


def write_manifest(folder: Path, manifest: dict) -> dict:
    manifest = {**manifest, "files": file_hashes(folder)}
    write_json(folder / MANIFEST, manifest)
    return manifest


def publish(staging: Path, final_dir: Path, force: bool) -> Path:
    """Rename the complete staging folder into place (replacing an old version only with force), and
    drop the rejected reports of an earlier failed run of the same version."""
    if final_dir.exists() and not force:
        raise UserError(f"artifact {final_dir} already exists; bump output.version or pass --force")
    scratch.replace(staging, final_dir)
    # a report of an earlier failed run of this version is out of date now that it passed
    rejected = final_dir.parent / REJECTED
    shutil.rmtree(rejected / final_dir.name, ignore_errors=True)
    if rejected.is_dir() and not any(rejected.iterdir()):
        rejected.rmdir()
    return final_dir


def reject(staging: Path, final_dir: Path, keep: tuple[str, ...]) -> Path:
    """Move only the reports of a failed run to `<name>/_rejected/<version>/`; drop the model."""
    target = final_dir.parent / REJECTED / final_dir.name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in keep:
        if (staging / name).exists():
            shutil.move(str(staging / name), target / name)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def read_manifest(folder: Path) -> dict:
    """An artifact's manifest.

    Raises:
        UserError: no manifest, or one that is not a JSON object with a `files` table (damaged or
            not ours).
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        # the artifact's name folder instead of one of its versions: name them
        versions = sorted(p.parent.name for p in folder.glob(f"[!._]*/{MANIFEST}")) if folder.is_dir() else []
        hint = f"; versions in it: {', '.join(versions)} (pass one of those folders)" if versions else ""
        raise UserError(f"{folder} is not an artifact (no {MANIFEST}){hint}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{manifest_path} is not valid JSON ({e}): the artifact is damaged") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{manifest_path} has no 'files' table: not an artifact manifest")
    return manifest


def verify(folder: Path) -> list[str]:
    """Re-hash an artifact; returns one line per missing, extra or changed file.

    Raises:
        UserError: see `read_manifest`.
    """
    recorded = read_manifest(folder)["files"]
    actual = file_hashes(folder)
    problems = [f"missing: {n}" for n in recorded if n not in actual]
    problems += [f"unexpected: {n}" for n in actual if n not in recorded]
    problems += [f"changed: {n}" for n in recorded if n in actual and actual[n] != recorded[n]]
    return problems


def fallback_outcome(report: dict, cfg: dict) -> str:
    """One line on what a fallback did (its manifest record and the recipe's `fallback` section, as dicts).

    E.g. "5 linears in float (2.9% of linear MACs); on the scored calibration windows ppl x1.0046,
    KL 0.0112: target ppl <= x1.005 met".
    """
    final, n = report["final"], len(report["fallback"])
    wanted = [f"KL <= {cfg['target_kl']:g}"] if cfg.get("target_kl") is not None else []
    wanted += [f"ppl <= x{cfg['target_ppl_ratio']:g}"] if cfg.get("target_ppl_ratio") is not None else []
    verdict = "met" if report["target_met"] else f"NOT met within max_float_mac_share {cfg['max_float_mac_share']:g}"
    return (f"{n} linear{'s' if n != 1 else ''} in float ({100 * report['float_mac_share']:.1f}% of linear MACs); "
            f"on the scored calibration windows ppl x{final['ppl_ratio']:.4f}, KL {final['kl']:.4f}: "
            f"target {' and '.join(wanted) or 'none'} {verdict}")


def int8_linears_text(build: dict) -> str:
    """"14 linears run as int8 kernels", or what is known when the backend does not say (MIGraphX)."""
    if build.get("fused_linears") is not None:
        return f"{build['fused_linears']} linears run as int8 kernels"
    dots = build.get("int8_dot_instructions")
    return ("int8 linears: unknown (the backend does not map its instructions to linears"
            + (f"; its compiled program holds {dots} int8 dot instructions)" if dots is not None else ")"))


def parity_markdown(name: str, version: str, report: dict, build: dict) -> str:
    """Human-readable parity report: one table per evaluation set, then the comparator runs."""
    sets = report.get("sets") or [{"name": "eval", **{k: report[k] for k in ("metrics", "thresholds", "generation")}}]
    status = "PASSED" if report["passed"] else "FAILED"
    lines = [f"# Parity report: {name} {version}", "",
             f"**{status}**; {int8_linears_text(build)}.", ""]
    for s in sets:
        m = s["metrics"]
        named = len(sets) > 1 or s["name"] != "eval"  # the single-mapping form of parity.eval is `eval`
        lines += [f"## Evaluation set `{s['name']}`: {m['windows']} held-out windows ({m['tokens']} tokens)" if named
                  else f"## {m['windows']} held-out windows ({m['tokens']} tokens)", "",
                  "| metric | value | threshold |", "|---|---|---|",
                  *[f"| {a} | {b} | {c} |" for a, b, c in _set_rows(s)], ""]
        lines += [f"> warning: {w}" for w in s.get("warnings", [])] + ([""] if s.get("warnings") else [])
    if report["comparator"]:
        lines += ["## Polygraphy comparator (first set's windows)", "", "| check | value | threshold |", "|---|---|---|"]
        for c in report["comparator"]:
            value = c["max_absdiff"] if c["error_stat"] == "max" else c["mean_absdiff"]
            lines.append(f"| Polygraphy {c['name']} ({c['error_stat']} abs diff) | {value:.4g} | <= {c['atol']} |")
    if report["failures"]:
        lines += ["", "## Failures", "", *[f"- {f}" for f in report["failures"]]]
    return "\n".join(lines) + "\n"


def _set_rows(s: dict) -> list[tuple[str, str, str]]:
    """(metric, value, threshold) rows of one evaluation set."""
    m, t = s["metrics"], s["thresholds"]
    compared = m.get("compared", "logits")
    rows = [
        (label, fmt.format(m[key]), limit)
        for label, key, fmt, limit in (
            ("perplexity, FP32 PyTorch", "reference_ppl", "{:.3f}", ""),
            ("perplexity, INT8 artifact", "candidate_ppl", "{:.3f}", ""),
            ("perplexity ratio", "ppl_ratio", "{:.4f}", f"<= {t['max_ppl_ratio']}"),
            (f"mean {compared} cosine", "mean_cosine", "{:.5f}", f">= {t['min_mean_cosine']}"),
            (f"min {compared} cosine", "min_cosine", "{:.5f}", f">= {t['min_min_cosine']}"),
            ("top-1 agreement", "top1_agreement", "{:.4f}", f">= {t['min_top1_agreement']}"),
            ("KL(FP32 || INT8), mean per token", "kl_mean", "{:.5f}", f"<= {t['max_kl']}"),
        )
        if m.get(key) is not None  # encoders have no perplexity or KL
    ]
    g = s.get("generation")
    if g:
        n = g["new_tokens"]
        y = g.get("yardstick")
        rows += [
            (f"greedy token agreement, {n} new tokens x {g['prompts']} prompts", f"{g['token_agreement']:.4f}",
             f">= {t.get('min_token_agreement')}"),
            ("greedy prefix agreement (first divergence / N)", f"{g['prefix_agreement']:.4f}", ""),
            *([("stepwise agreement (each step fed the FP32 tokens before it)", f"{g['stepwise_agreement']:.4f}",
                f">= {t.get('min_stepwise_agreement')}")] if g.get("stepwise_agreement") is not None else []),
            ("first divergence per prompt", ", ".join(str(d) for d in g["first_divergence"]), f"{n} = none"),
            *([(f"yardstick: {y['dtype']} PyTorch vs FP32, token / stepwise agreement",
                f"{y['token_agreement']:.4f} / {y['stepwise_agreement']:.4f}", "reported")] if y else []),
        ]
    return rows
