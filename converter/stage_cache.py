"""Content-addressed cache of the expensive stages, keyed by a hash of everything that feeds them.

    calibrate  <- checkpoint sha256, calibration windows sha256, quantization.exclude, tool versions
    smooth     <- calibrate key + smoothing section  (smoothed weights, report, re-calibrated maxima)
    export     <- smooth key + quantization + export sections  (FP32 and QDQ ONNX, static scales)
    parity     <- QDQ model sha256, target and its build report, evaluation windows, generation prompts,
                  checkpoint, samples

So a recipe that differs only in targets or parity thresholds reuses everything up to the model
file, and re-checks the cached parity measurements against its own thresholds. Entries are written
to a temporary folder and renamed into place, so a crash never leaves a half-written entry that a
later run would trust. `--no-cache` (a disabled `StageCache`) computes everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from converter import scratch

CACHE_FORMAT = 6  # bump when what an entry holds changes (3: RMSNorm exported as Sqrt -> Div; 4: merged MatMuls;
# 5: grouped-query attention exported without repeated K/V; 6: fake quant sums integer products, so a global
# alpha search's and a fallback's scores moved in their last bits)
PARITY_FORMAT = 3  # parity entries only (2: one row per evaluation set, BF16 yardstick; 3: batched generation)
ENV_DIR = "CONVERTER_CACHE_DIR"
_META = "meta.json"


def default_dir() -> Path:
    """`$CONVERTER_CACHE_DIR`, else `$XDG_CACHE_HOME/smoothquant-converter` (`~/.cache/...`)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smoothquant-converter"


def digest(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class StageKeys:
    calibrate: str
    smooth: str
    export: str


def stage_keys(recipe, checkpoint_sha256: str, calibration_sha256: str, selection_sha256: str | None = None) -> StageKeys:
    """Keys of the calibrate / smooth / export entries for one run (each includes the one before).

    Args:
        selection_sha256: the selection windows' digest (what the alpha search and the fallback score);
            None when they score the calibration windows.
    """
    from converter.artifact.package import tool_versions

    r = recipe.recipe
    # a recipe's layer map decides which linears are calibrated and smoothed (absent: the built-in table)
    layer_map = [r.architecture.model_dump(mode="json")] if r.architecture is not None else []
    calibrate = digest("calibrate", CACHE_FORMAT, tool_versions(), checkpoint_sha256, calibration_sha256,
                       r.quantization.exclude, r.calibration.batch_size, *layer_map)
    # an alpha search scores fake-quant outputs, so its result depends on quantization settings too:
    # all of them for the global search (whole fake-quant models), the activation level per group
    searched_with = {"global": r.quantization.model_dump(mode="json"),
                     "per_group": r.quantization.activations.level,
                     "per_block": r.quantization.activations.level}.get(r.smoothing.search)
    # the selection text matters only to what scores on it (absent or unread: the keys of before)
    tuned = r.smoothing.search != "off" or r.quantization.fallback.enabled
    selected_on = [selection_sha256] if selection_sha256 is not None and tuned else []
    smooth = digest("smooth", calibrate, r.smoothing.model_dump(mode="json"), searched_with, *selected_on)
    export = digest("export", smooth, r.quantization.model_dump(mode="json"), r.export.model_dump(mode="json"),
                    *([r.embedding_layout] if r.embedding_layout else []))  # chosen by the targets
    return StageKeys(calibrate, smooth, export)


def check_key(engine: dict, strict: bool, model_sha256: str) -> str:
    """Key of the QDQ lint + TensorRT(-RTX) acceptance of one exported model (the tool versions
    include the TensorRT-RTX package, "not installed" when the check skips itself)."""
    from converter.artifact.package import tool_versions

    return digest("check", CACHE_FORMAT, tool_versions(), engine, strict, model_sha256)


def parity_key(recipe, target: str, build: dict, model_sha256: str, checkpoint_sha256: str, eval_sha256: list[str],
               prompts: list[list[list[int]]]) -> str:
    """Key of a target's parity measurements: thresholds are not in it, they are re-applied.

    Args:
        build: the target's build report; any change in what was built (kernels, an engine) misses.
        eval_sha256: every evaluation set's windows digest, in the recipe's order.
        prompts: each set's generation prompts' token ids (a changed prompts file, template or tokenizer misses).
    """
    from converter.artifact.package import tool_versions

    r = recipe.recipe
    sets = [(s.name, s.batch_size) for s in r.parity.sets]
    return digest("parity", CACHE_FORMAT, PARITY_FORMAT, prompts, tool_versions(), target, build, model_sha256,
                  checkpoint_sha256, eval_sha256, sets, r.parity.polygraphy.samples,
                  r.parity.generation.model_dump(mode="json"))


class StageCache:
    """Entries under `<root>/<stage>/<key>/`; `root=None` disables the cache (every lookup misses)."""

    def __init__(self, root: Path | None):
        self.root = root
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def get(self, stage: str, key: str) -> tuple[Path, dict] | None:
        """(entry folder, its metadata) when a complete, intact entry exists.

        Every stored file is re-hashed: an entry damaged on disk is deleted and reported as a miss,
        so it can never leak into an artifact.
        """
        if self.root is None:
            return None
        entry = self.root / stage / key
        if not (entry / _META).is_file():
            return None
        from converter.models.load import sha256_file

        try:
            meta = json.loads((entry / _META).read_text())
            hashes = meta["_sha256"]
            intact = all((entry / n).is_file() and sha256_file(entry / n) == h for n, h in hashes.items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # unreadable or not ours: damaged
            intact = False
        if not intact:
            shutil.rmtree(entry, ignore_errors=True)
            return None
        return entry, meta

    def put(self, stage: str, key: str, files: dict[str, Path], meta: dict, tensors: dict | None = None) -> None:
        """Store files (copied), metadata and optional tensors as one entry, atomically.

        A cache that cannot be written (a full disk, a path under a file, no permission) costs the
        next run its speed, not this run its result: a warning, and the run goes on.
        """
        if self.root is None:
            return
        try:
            self._put(stage, key, files, meta, tensors)
        except OSError as exc:
            from converter.progress import warn

            if not self._warned:  # once: every later stage would fail the same way
                warn(f"stage cache {self.root}: could not store the {stage} entry ({exc}); the run goes on "
                     "without storing")
            self._warned = True

    def _put(self, stage: str, key: str, files: dict[str, Path], meta: dict, tensors: dict | None) -> None:
        parent = self.root / stage
        with scratch.folder(parent, ".tmp-") as tmp:
            for name, source in files.items():
                shutil.copyfile(source, tmp / name)
            if tensors:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "tensors.safetensors")
            from converter.models.load import sha256_file

            scratch.seal(tmp)
            stored = sorted(p.name for p in tmp.iterdir())
            meta = {**meta, "_sha256": {name: sha256_file(tmp / name) for name in stored}}
            (tmp / _META).write_text(json.dumps(meta, indent=1))
            try:
                tmp.rename(parent / key)
            except OSError:  # another run stored the same entry first: identical content, keep theirs
                pass


def load_tensors(entry: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(entry / "tensors.safetensors")


def save_stats(cache: StageCache, stage: str, key: str, stats) -> None:
    cache.put(stage, key, {}, {"batches": stats.batches, "tokens": stats.tokens}, tensors=stats.amax)


def load_stats(cache: StageCache, stage: str, key: str):
    """Cached `ActStats`, or None."""
    from converter.quant.calibrate import ActStats

    hit = cache.get(stage, key)
    if hit is None:
        return None
    entry, meta = hit
    return ActStats(amax=load_tensors(entry), batches=meta["batches"], tokens=meta["tokens"])


def save_smoothed(cache: StageCache, key: str, model: torch.nn.Module, smoothing: dict, stats, work: Path) -> None:
    """The smoothed weights, the smoothing record (groups, search) and the maxima re-measured on them."""
    if not cache.enabled:
        return
    from safetensors.torch import save_model

    weights = work / "smoothed.safetensors"
    save_model(model, str(weights))  # handles tied embeddings, which save_file refuses
    meta = {"smoothing": smoothing, "batches": stats.batches, "tokens": stats.tokens}
    cache.put("smooth", key, {"smoothed.safetensors": weights}, meta, tensors=stats.amax)
    weights.unlink()


def load_smoothed(cache: StageCache, key: str, model: torch.nn.Module):
    """Load cached smoothed weights into `model`; returns (smoothing record, ActStats) or None."""
    from safetensors.torch import load_model

    from converter.quant.calibrate import ActStats

    hit = cache.get("smooth", key)
    if hit is None:
        return None
    entry, meta = hit
    weights = entry / "smoothed.safetensors"
    _untie_as_saved(model, weights)
    load_model(model, str(weights))
    return meta["smoothing"], ActStats(amax=load_tensors(entry), batches=meta["batches"], tokens=meta["tokens"])


def _untie_as_saved(model: torch.nn.Module, weights: Path) -> None:
    """Smoothing the head group unties a tied lm_head, so the saved file holds the lm_head and the
    input embedding as two tensors; a freshly loaded (tied) model must be untied the same way
    before those load into it."""
    from safetensors import safe_open

    from converter.quant.smooth import untie_output_embeddings

    head = model.get_output_embeddings()
    if head is None:
        return
    shared = [name for name, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
    with safe_open(str(weights), framework="pt") as f:
        saved = set(f.keys())
    if len(shared) > 1 and all(name in saved for name in shared):
        untie_output_embeddings(model)


def _plan_to_entry(plan) -> tuple[dict, dict]:
    meta = {"excluded": plan.excluded, "linears": [
        {"name": q.name, "in_features": q.in_features, "out_features": q.out_features,
         "act_amax": q.act_amax, "weight_rel_error": q.weight_rel_error, "act_mode": q.act_mode} for q in plan.linears.values()]}
    tensors = {}
    for q in plan.linears.values():
        tensors[f"{q.name}.act_scale"] = q.act_scale
        tensors[f"{q.name}.weight_scale"] = q.weight_scale
    if plan.embedding is not None:
        meta["embedding"] = {"name": plan.embedding.name, "weight_rel_error": plan.embedding.weight_rel_error}
        tensors[f"{plan.embedding.name}.embedding_scale"] = plan.embedding.weight_scale
    return meta, tensors


def _plan_from_entry(meta: dict, tensors: dict):
    from converter.quant.quantize import EmbeddingQuant, LinearQuant, QuantPlan

    linears = {q["name"]: LinearQuant(**q, act_scale=tensors[f"{q['name']}.act_scale"],
                                      weight_scale=tensors[f"{q['name']}.weight_scale"]) for q in meta["linears"]}
    embedding = meta.get("embedding")
    if embedding is not None:
        embedding = EmbeddingQuant(**embedding, weight_scale=tensors[f"{embedding['name']}.embedding_scale"])
    return QuantPlan(linears=linears, excluded=meta["excluded"], embedding=embedding)


def _model_files(path: Path) -> list[Path]:
    """An ONNX file and its external data file, if any."""
    return [path, *[p for p in [path.with_name(f"{path.name}.data")] if p.is_file()]]


def model_sha256(path: Path) -> str:
    """One digest of an ONNX model's bytes: the graph file and its external data file, if any
    (with external data the weights are not in the graph file)."""
    from converter.models.load import sha256_file

    return digest(*[(p.name, sha256_file(p)) for p in _model_files(path)])


def save_export(cache: StageCache, key: str, qdq, fp32_path: Path, plan, front: dict) -> None:
    """The QDQ model, the FP32 model (parity compares against it) and what the manifest records.

    Files keep their names (external data is found by name), prefixed by `qdq__` / `fp32__`.
    """
    if not cache.enabled:
        return
    files = {f"qdq__{p.name}": p for p in _model_files(qdq.path)}
    files.update({f"fp32__{p.name}": p for p in _model_files(fp32_path)})
    plan_meta, tensors = _plan_to_entry(plan)
    meta = {"plan": plan_meta, "front": front,
            "qdq": {"quantized_matmuls": qdq.quantized_matmuls, "external_data": qdq.external_data,
                    "size_bytes": qdq.size_bytes}}
    cache.put("export", key, files, meta, tensors=tensors)


def load_export(cache: StageCache, key: str, qdq_path: Path, fp32_path: Path):
    """Copy the cached models to `qdq_path` / `fp32_path` (same file names as when stored).

    Returns:
        (QdqResult, QuantPlan, front record), or None on a miss.
    """
    from converter.export.exporter import QdqResult

    hit = cache.get("export", key)
    if hit is None:
        return None
    entry, meta = hit
    for prefix, dest in (("qdq__", qdq_path), ("fp32__", fp32_path)):
        for cached in sorted(entry.glob(f"{prefix}*")):
            shutil.copyfile(cached, dest.parent / cached.name.removeprefix(prefix))
    plan = _plan_from_entry(meta["plan"], load_tensors(entry))
    return QdqResult(path=qdq_path, **meta["qdq"]), plan, meta["front"]


def load_checks(cache: StageCache, key: str) -> dict | None:
    hit = cache.get("check", key)
    return None if hit is None else hit[1]["checks"]


def save_checks(cache: StageCache, key: str, checks: dict) -> None:
    cache.put("check", key, {}, {"checks": checks})


def save_parity(cache: StageCache, key: str, report) -> None:
    cache.put("parity", key, {}, {"sets": [{"name": s.name, "metrics": asdict(s.metrics), "generation": s.generation}
                                           for s in report.sets],
                                  "comparator": [asdict(c) for c in report.comparator]})


def load_parity(cache: StageCache, key: str, recipe):
    """Cached parity measurements judged against this recipe's thresholds and atols, or None."""
    from converter.parity.metrics import ComparatorCheck, ParityMetrics, judge

    hit = cache.get("parity", key)
    if hit is None:
        return None
    _, meta = hit
    cfg = recipe.recipe.parity
    atols = {"export_fidelity": cfg.polygraphy.export_atol, "int8_vs_fp32_onnx": cfg.polygraphy.int8_atol}
    checks = []
    for c in meta["comparator"]:
        atol = atols[c["name"]]
        value = c["max_absdiff"] if c["error_stat"] == "max" else c["mean_absdiff"]
        # Polygraphy's verdict with rtol 0 is `stat <= atol`; re-judged here against the new atol.
        checks.append(ComparatorCheck(**{**c, "runners": tuple(c["runners"]), "atol": atol, "passed": value <= atol}))
    measured = [(s["name"], ParityMetrics(**s["metrics"]), s["generation"]) for s in meta["sets"]]
    return judge(measured, checks, cfg)
