"""Benchmark the shipped SmolLM2-135M recipe: accuracy sweep, ORT latency, conversion cost.

    .venv/bin/python bench/smollm2.py [--runs 3] [--latency-iters 60]

Every number comes from the real pipeline (`convert.py` in a subprocess, one per configuration) or
from ONNX Runtime sessions timed side by side in one process. Prints a Markdown table and writes
bench/results/smollm2.json and bench/results/smollm2.md, which the README quotes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from cli_run import SMOLLM2_FP32, against, no_gates, run_convert, stamp, time_interleaved, write_results

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-cpu.yaml"
NO_GATES = no_gates(RECIPE)
SWEEP = {
    "naive static W8A8 (no smoothing)": ["smoothing.enabled=false"],
    "SmoothQuant static W8A8, alpha 0.5": ["smoothing.alpha=0.5"],
    "SmoothQuant static W8A8, alpha 0.65": ["smoothing.alpha=0.65"],
    "SmoothQuant static W8A8, alpha 0.8, lm_head float": ["quantization.exclude=[lm_head]"],
    "SmoothQuant static W8A8, alpha 0.8, lm_head int8 (shipped recipe)": [],
}
SHIPPED = "SmoothQuant static W8A8, alpha 0.8, lm_head int8 (shipped recipe)"
HEAD_FLOAT = "SmoothQuant static W8A8, alpha 0.8, lm_head float"


def convert(out: Path, overrides: list[str]) -> tuple[dict, float]:
    """Run the converter as a user would; returns (JSON result, wall seconds)."""
    # --no-cache: every run measures the full conversion (bench/cache.py measures the cache)
    return run_convert(RECIPE, out, overrides + NO_GATES + ["parity.polygraphy.int8_atol=1000"], ["--no-cache"])


def latency(int8_paths: dict[str, Path], iters: int, threads: int = 2, seq: int = 256) -> dict:
    """FP32 ONNX (original model) vs INT8 artifacts, batch 1, runs interleaved (see cli_run.against);
    the iterations span about a minute, so both of the machine's speed phases are in them."""
    import numpy as np
    import torch

    from converter.export.exporter import float_graph
    from converter.export.kv_graph import graph_kv_layout, prefill_feed
    from converter.models.load import load_reference
    from converter.recipe import Export, load_recipe
    from converter.targets.runners import onnxruntime_session

    recipe = load_recipe(RECIPE)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        model = load_reference(recipe.path(recipe.recipe.source.path), recipe.recipe.source)
        float_graph(model, fp32_path, Export())  # the artifact's graph passes, no Q/DQ
        del model
        sessions = {name: onnxruntime_session(path, threads=threads)
                    for name, path in {"fp32": fp32_path, **int8_paths}.items()}
        ids = torch.randint(0, 49152, (1, seq), generator=torch.Generator().manual_seed(0)).numpy()
        # a KV-cache artifact runs the window as a prefill (empty past tensors)
        feeds = {name: prefill_feed(ids, np.ones_like(ids), graph_kv_layout(path))
                 for name, path in {"fp32": fp32_path, **int8_paths}.items()}
        times = time_interleaved(sessions, feeds, iters)
    return {"batch": 1, "sequence": seq, "threads": threads, "iterations": iters, **against(times), "all_ms": times}


def markdown(results: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct ({SMOLLM2_FP32}), {results['machine']}, {results['date']}", "",
             "| configuration | perplexity (Apache-2.0 text) | vs FP32 | top-1 agreement | int8 linears |",
             "|---|---|---|---|---|"]
    fp32 = results["sweep"][next(iter(results["sweep"]))]["reference_ppl"]
    lines.append(f"| FP32 (PyTorch) | {fp32:.2f} | 1.000 | 1.000 | 0 |")
    for name, m in results["sweep"].items():
        lines.append(f"| {name} | {m['candidate_ppl']:.2f} | {m['ppl_ratio']:.3f} | {m['top1_agreement']:.3f} | "
                     f"{m['fused_linears']} |")
    lat = results["latency"]
    conv = results["conversion"]
    lines += ["", f"| ONNX Runtime, batch 1, seq {lat['sequence']}, {lat['threads']} threads | median of "
                  f"{lat['iterations']} (interleaved) | vs FP32: median of iterations [min, max] |",
              "|---|---|---|",
              f"| FP32 ONNX | {lat['median_ms']['fp32']:.1f} ms | 1.000 |",
              *[f"| INT8 QDQ ONNX, {n} | {lat['median_ms'][n]:.1f} ms | {lat['over_fp32'][n]:.3f}x "
                f"[{lat['over_fp32_range'][n][0]:.3f}, {lat['over_fp32_range'][n][1]:.3f}] |" for n in lat["over_fp32"]],
              "", f"| conversion of the shipped recipe | median of {conv['runs']} |", "|---|---|",
              f"| wall time | {conv['wall_s_median']:.1f} s (runs: {', '.join(f'{w:.1f}' for w in conv['wall_s'])}) |",
              f"| peak memory (max RSS) | {conv['peak_rss_mb_median']:.0f} MB |",
              "| stages (last run, s) | " + ", ".join(f"{s['name']} {s['seconds']:.1f}" for s in conv["stages"]) + " |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="conversions of the shipped recipe to time")
    parser.add_argument("--latency-iters", type=int, default=60)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        sweep, artifacts, walls, peaks = {}, {}, [], []
        for index, (name, overrides) in enumerate(SWEEP.items()):
            # rows other than the shipped recipe (timed) report perplexity and top-1 only: no generation parity
            result, wall = convert(Path(tmp) / str(index),
                                   overrides + ([] if name == SHIPPED else ["parity.generation.enabled=false"]))
            target = result["targets"]["cpu-onnxruntime"]
            sweep[name] = {**target["parity"]["metrics"], "fused_linears": target["fused_linears"]}
            artifacts[name] = Path(result["artifact"]) / "model.onnx"
            print(f"{name}: ppl {sweep[name]['candidate_ppl']:.2f} (x{sweep[name]['ppl_ratio']:.3f})", file=sys.stderr)
            if name == SHIPPED:  # the shipped recipe's sweep run is its first timed conversion
                walls.append(wall)
                peaks.append(result["peak_rss_mb"])
        for run in range(args.runs - 1):
            result, wall = convert(Path(tmp) / f"timed{run}", [])
            walls.append(wall)
            peaks.append(result["peak_rss_mb"])
        lat = latency({"shipped recipe": artifacts[SHIPPED], "lm_head float": artifacts[HEAD_FLOAT]},
                      args.latency_iters)
    results = {
        **stamp(),
        "sweep": sweep,
        "latency": lat,
        "conversion": {"runs": args.runs, "wall_s": walls, "wall_s_median": statistics.median(walls),
                       "peak_rss_mb": peaks, "peak_rss_mb_median": statistics.median(peaks),
                       "stages": result["stages"]},
    }
    table = markdown(results)
    write_results("smollm2", results, table)
    print(table)


if __name__ == "__main__":
    main()
