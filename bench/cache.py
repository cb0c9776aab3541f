"""Benchmark the stage cache: re-runs of a recipe that change parity thresholds, then the activation range.

    .venv/bin/python bench/cache.py [--recipe recipes/smollm2-135m-cpu.yaml] [--name cache]

Runs `convert.py` three times in subprocesses against a fresh, empty cache folder: first the recipe
as shipped; second with only the parity thresholds changed (every model stage from the cache);
third with the activation range method changed as well (calibration and smoothing from the cache,
quantization, export and parity recomputed). Target: the second run's wall time under 30% of the
first. Prints a Markdown table and writes bench/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cli_run import no_gates, run_convert, stamp, write_results

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.30
RANGE_CHANGE = ["quantization.activations.range=mse"]


def run(recipe: Path, out: Path, cache: Path, overrides: list[str]) -> tuple[dict, float]:
    return run_convert(recipe, out, overrides, ["--cache-dir", str(cache)])


def markdown(results: dict) -> str:
    rows = [f"{results['recipe']}, {results['machine']}, {results['date']}", "",
            "| run | wall time | stages (s; * = from cache) |", "|---|---|---|"]
    for run_ in results["runs"]:
        stages = ", ".join(f"{s['name']} {s['seconds']:.1f}{'*' if s['cache'] == 'hit' else ''}" for s in run_["stages"])
        rows.append(f"| {run_['label']} | {run_['wall_s']:.1f} s | {stages} |")
    verdict = "met" if results["ratio"] < TARGET_RATIO else "NOT met"
    rows += ["", f"second / first: {results['ratio']:.3f} (target < {TARGET_RATIO}: {verdict})"]
    if len(results["runs"]) > 2:
        rows += [f"third / first: {results['runs'][2]['wall_s'] / results['runs'][0]['wall_s']:.3f}"]
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "smollm2-135m-cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra override for both runs (e.g. for a tiny recipe)")
    parser.add_argument("--name", default="cache", help="results file name (bench/results/<name>.*)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache, runs = Path(tmp) / "cache", []
        # only thresholds change (all of them off, every set's: the later runs publish whatever they measure)
        thresholds = no_gates(args.recipe)
        for label, extra in (("first (empty cache)", []), ("second (thresholds changed)", thresholds),
                             ("third (activation range changed too)", thresholds + RANGE_CHANGE)):
            result, wall = run(args.recipe, Path(tmp) / "out", cache, args.overrides + extra)
            runs.append({"label": label, "wall_s": round(wall, 2), "stages": result["stages"]})
    results = {
        "recipe": args.recipe.name,
        **stamp(),
        "runs": runs,
        "ratio": round(runs[1]["wall_s"] / runs[0]["wall_s"], 4),
        "target_ratio": TARGET_RATIO,
    }
    table = markdown(results)
    print(table)
    write_results(args.name, results, table)


if __name__ == "__main__":
    main()
