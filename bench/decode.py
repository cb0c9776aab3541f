"""Decode speed with the KV cache: FP32 ONNX vs the INT8 artifact, batch 1, 2 threads.

    .venv/bin/python bench/decode.py [--artifact DIR] [--runs 31] [--new-tokens 64] [--prompt-tokens 32 448]

Without --artifact the shipped recipe is converted first (through the real CLI), and, when it fuses
attention (`export.attention: onnxruntime`), converted once more with `export.attention=onnx` so the
standard-ONNX graphs run side by side in the same runs. Each FP32 baseline is the original
checkpoint exported with the same KV-cache graph layout and attention as its INT8 graph. Each run prefills each
prompt of the evaluation text (a short one, and a long one where the attention over the cache
weighs more), then times `--new-tokens` greedy one-token decode steps; runs alternate between the
two models. Reported per prompt length: the median tokens/s of each, and the INT8/FP32 ratio of
each back-to-back pair of runs (median, min, max). This machine's speed changes every few tens of
seconds under other load, and the phases hit the two graphs differently (on some days INT8 drops,
on others FP32), so the runs span a few minutes and a pair's ratio is taken within one phase.
Writes bench/results/decode.json and bench/results/decode.md, which the README quotes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cli_run import SMOLLM2_FP32, run_convert, shipped_artifact, stamp, write_results

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-cpu.yaml"


def decode_rate(session, layout, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """(decode tokens/s after the prefill, tokens), greedy, EOS ignored."""
    from converter.parity.generation import greedy_graph, session_step

    tokens = []
    stream = greedy_graph(session_step(session), layout, prompt, new_tokens + 1)
    tokens.append(next(stream))  # the prefill's token: not a decode step
    start = time.perf_counter()
    tokens += list(stream)
    return new_tokens / (time.perf_counter() - start), tokens


def fused_attention(path: Path) -> str:
    """The `export.attention` a graph was exported with: 'onnxruntime' when it holds GroupQueryAttention."""
    import onnx

    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    return "onnxruntime" if "GroupQueryAttention" in ops else "onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="an artifact folder (default: convert the shipped recipe)")
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[32, 448],
                        help="prompt lengths (tokens of the evaluation text), each timed in every run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from converter.export.exporter import float_graph
    from converter.export.kv_graph import graph_kv_layout
    from converter.models.load import load_reference
    from converter.models.text import added_special_tokens, token_windows
    from converter.recipe import Export, load_recipe
    from converter.targets.runners import onnxruntime_session

    recipe = load_recipe(RECIPE)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = shipped_artifact(args.artifact, RECIPE, Path(tmp))
        int8 = {fused_attention(artifact / "model.onnx"): artifact / "model.onnx"}
        if args.artifact is None and "onnxruntime" in int8:
            int8["onnx"] = Path(run_convert(RECIPE, Path(tmp) / "standard", ["export.attention=onnx"], [])[0]["artifact"]) / "model.onnx"
        if graph_kv_layout(artifact / "model.onnx") is None:
            raise SystemExit(f"{artifact / 'model.onnx'} has no KV cache inputs (export.kv_cache: false)")
        model = load_reference(recipe.path(recipe.recipe.source.path), recipe.recipe.source)
        graphs = {}
        for attention, int8_path in int8.items():
            # the artifact's graph passes (constant folding, RMSNorm fusable, attention), nothing quantized
            graphs[f"fp32/{attention}"] = float_graph(model, Path(tmp) / f"fp32-{attention}.onnx",
                                                      Export(kv_cache=True, attention=attention))
            graphs[f"int8/{attention}"] = int8_path
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(artifact))
        windows = token_windows(recipe, recipe.recipe.parity.sets[0].text(), tokenizer, shuffle=False)
        # one stream of text, after the BOS the tokenizer starts every text with (if any)
        text = added_special_tokens(tokenizer)[0] + [int(t) for t in windows.input_ids.reshape(-1)]
        if max(args.prompt_tokens) > len(text):
            raise SystemExit(f"--prompt-tokens {max(args.prompt_tokens)}: the evaluation text holds {len(text)}")
        prompts = {n: text[:n] for n in args.prompt_tokens}
        del model
        sessions = {}
        for name, path in graphs.items():
            sessions[name] = (onnxruntime_session(path, threads=args.threads), graph_kv_layout(path))
        # Settle before timing: flush the freshly written model files (their write-back otherwise
        # competes for the CPU: INT8 runs right after a conversion climbed from 80 to 104 tokens/s)
        # and warm each session with one full-length run.
        os.sync()
        for session, layout in sessions.values():
            decode_rate(session, layout, prompts[max(prompts)], args.new_tokens)
        rates = {(n, name): [] for n in prompts for name in sessions}
        tokens = {}
        for _ in range(args.runs):
            for n, prompt in prompts.items():
                for name, (session, layout) in sessions.items():
                    rate, tokens[n, name] = decode_rate(session, layout, prompt, args.new_tokens)
                    rates[n, name].append(rate)
    per_length = {}
    for n in prompts:
        per_length[n] = {
            "tokens_per_s_median": {name: statistics.median(rates[n, name]) for name in sessions},
            "tokens_per_s_all": {name: rates[n, name] for name in sessions},
        }
        for attention in int8:
            pairs = [i8 / f32 for f32, i8 in zip(rates[n, f"fp32/{attention}"], rates[n, f"int8/{attention}"])]
            per_length[n][f"int8_over_fp32/{attention}"] = {
                "median": statistics.median(pairs), "range": [min(pairs), max(pairs)], "pairs": pairs,
                "greedy_token_agreement_this_prompt": sum(
                    a == b for a, b in zip(tokens[n, f"fp32/{attention}"], tokens[n, f"int8/{attention}"]))
                / len(tokens[n, f"fp32/{attention}"])}
        if len(int8) == 2:
            pairs = [f / s for s, f in zip(rates[n, "int8/onnx"], rates[n, "int8/onnxruntime"])]
            per_length[n]["int8_fused_over_standard_attention"] = {
                "median": statistics.median(pairs), "range": [min(pairs), max(pairs)]}
    results = {
        **stamp(),
        "note": args.note,
        "batch": 1, "threads": args.threads, "new_tokens": args.new_tokens, "runs": args.runs,
        "prompt_tokens": per_length,
    }
    label = {"onnxruntime": "GroupQueryAttention", "onnx": "standard ONNX attention"}
    lines = [f"SmolLM2-135M-Instruct decode with the KV cache ({SMOLLM2_FP32}), "
             f"{results['machine']}, {results['date']}"
             + (f" ({args.note})" if args.note else ""), "",
             f"| ONNX Runtime, batch 1, {args.threads} threads, {args.new_tokens} decode steps | prompt | "
             f"median of {args.runs} (interleaved) | vs FP32 (same attention): median of pairs [min, max] |",
             "|---|---|---|---|"]
    for n, r in per_length.items():
        for attention in int8:
            ratio = r[f"int8_over_fp32/{attention}"]
            low, high = ratio["range"]
            lines += [f"| FP32 ONNX, {label[attention]} | {n} tokens | "
                      f"{r['tokens_per_s_median'][f'fp32/{attention}']:.1f} tokens/s | 1.00x |",
                      f"| INT8 QDQ artifact, {label[attention]} | {n} tokens | "
                      f"{r['tokens_per_s_median'][f'int8/{attention}']:.1f} tokens/s | "
                      f"{ratio['median']:.2f}x [{low:.2f}, {high:.2f}] |"]
    for n, r in per_length.items():
        if "int8_fused_over_standard_attention" in r:
            f = r["int8_fused_over_standard_attention"]
            lines.append(f"\nINT8, {n}-token prompt: GroupQueryAttention over standard ONNX attention, median of pairs "
                         f"{f['median']:.2f}x [{f['range'][0]:.2f}, {f['range'][1]:.2f}]")
    table = "\n".join(lines) + "\n"
    write_results("decode", results, table)
    print(table)


if __name__ == "__main__":
    main()
