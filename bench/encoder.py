"""Benchmark the shipped all-MiniLM-L6-v2 encoder recipe: pooled-embedding cosine and ORT latency.

    .venv/bin/python bench/encoder.py [--latency-iters 60] [--note TEXT]

Each configuration is converted by `convert.py` in a subprocess (the shipped recipe, and every
linear int8 for comparison); FP32 ONNX and the INT8 artifacts are then timed side by side in one
process, runs interleaved, 2 threads. Prints a Markdown table and writes bench/results/minilm.json
and bench/results/minilm.md, which the README quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from cli_run import against, run_convert, stamp, time_interleaved, write_results

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "minilm-l6-cpu.yaml"
NO_GATES = ["parity.thresholds.min_mean_cosine=null", "parity.thresholds.min_min_cosine=null",
            "parity.polygraphy.int8_atol=1000"]
CONFIGS = {
    "shipped recipe": [],
    "every linear int8": ["quantization.exclude=[]", "quantization.activations.range_overrides={}"],
}


def latency(paths: dict[str, Path], iters: int, shapes, threads: int = 2) -> dict:
    """Per (batch, sequence) shape: every model's median ms and its time over FP32's in the same
    iteration (see cli_run.against), runs interleaved."""
    import numpy as np

    from converter.targets.runners import onnxruntime_session

    os.sync()  # freshly written model files: their write-back competes for the CPU (see bench/decode.py)
    sessions = {name: onnxruntime_session(path, threads=threads) for name, path in paths.items()}
    out = {}
    rng = np.random.default_rng(0)
    for batch, seq in shapes:
        ids = rng.integers(1000, 30000, (batch, seq), dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        times = time_interleaved(sessions, {name: feed for name in sessions}, iters)
        out[f"{batch}x{seq}"] = {"batch": batch, "sequence": seq, **against(times), "all_ms": times}
    return {"threads": threads, "iterations": iters, "shapes": out}


def fp32_onnx(folder: Path) -> Path:
    from converter.export.exporter import float_graph
    from converter.models.load import load_reference
    from converter.recipe import Export, load_recipe

    recipe = load_recipe(RECIPE)
    model = load_reference(recipe.path(recipe.recipe.source.path), recipe.recipe.source)
    return float_graph(model, folder / "fp32.onnx", Export())  # the artifact's graph passes, no Q/DQ


def markdown(results: dict) -> str:
    lines = [f"all-MiniLM-L6-v2, {results['machine']}, {results['date']}", ""]
    if results.get("note"):
        lines += [f"Note: {results['note']}", ""]
    lines += ["| configuration | int8 linears | float linears | pooled-embedding cosine mean / min (held-out) |",
              "|---|---|---|---|"]
    for name, c in results["configs"].items():
        lines.append(f"| {name} | {c['fused_linears']} | {len(c['float_linears'])} | "
                     f"{c['mean_cosine']:.5f} / {c['min_cosine']:.5f} |")
    lat = results["latency"]
    names = list(results["configs"])
    lines += ["", f"| ONNX Runtime, {lat['threads']} threads, median of {lat['iterations']} (interleaved); vs FP32: "
              "median of iterations [min, max] | FP32 | " + " | ".join(f"INT8, {n}" for n in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for shape, s in lat["shapes"].items():
        lines.append(f"| batch x seq {shape} | {s['median_ms']['fp32']:.1f} ms | " + " | ".join(
            f"{s['median_ms'][n]:.1f} ms ({s['over_fp32'][n]:.2f}x [{s['over_fp32_range'][n][0]:.2f}, "
            f"{s['over_fp32_range'][n][1]:.2f}])" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-iters", type=int, default=60)
    parser.add_argument("--note", default="", help="recorded with the results (e.g. machine load)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    configs, paths = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, overrides) in enumerate(CONFIGS.items()):
            result, wall = run_convert(RECIPE, Path(tmp) / str(index), overrides + NO_GATES, ["--no-cache"])
            target = result["targets"]["cpu-onnxruntime"]
            manifest = json.loads((Path(result["artifact"]) / "manifest.json").read_text())
            m = target["parity"]["metrics"]
            configs[name] = {"mean_cosine": m["mean_cosine"], "min_cosine": m["min_cosine"],
                             "fused_linears": target["fused_linears"],
                             "float_linears": manifest["model"]["float_linears"], "convert_wall_s": wall}
            paths[name] = Path(result["artifact"]) / "model.onnx"
            print(f"{name}: cosine {m['mean_cosine']:.5f} / {m['min_cosine']:.5f}", file=sys.stderr)
        lat = latency({"fp32": fp32_onnx(Path(tmp)), **paths}, args.latency_iters, [(1, 128), (8, 128)])
    results = {
        **stamp(),
        "note": args.note,
        "configs": configs,
        "latency": lat,
    }
    table = markdown(results)
    write_results("minilm", results, table)
    print(table)


if __name__ == "__main__":
    main()
