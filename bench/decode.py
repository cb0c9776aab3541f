"""Decode speed with the KV cache: FP32 ONNX vs the INT8 artifact, batch 1, 2 threads.

    .venv/bin/python bench/decode.py [--artifact DIR] [--runs 31] [--new-tokens 64] [--prompt-tokens 32 448]

Without --artifact the shipped recipe is converted first (through the real CLI). The FP32 baseline
is the original checkpoint exported with the same KV-cache graph layout. Each run prefills each
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

from cli_run import shipped_artifact, stamp, write_results

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-cpu.yaml"


def decode_rate(session, layout, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """(decode tokens/s after the prefill, tokens), greedy, EOS ignored."""
    from converter.generation import greedy_graph, session_step

    tokens = []
    stream = greedy_graph(session_step(session), layout, prompt, new_tokens + 1)
    tokens.append(next(stream))  # the prefill's token: not a decode step
    start = time.perf_counter()
    tokens += list(stream)
    return new_tokens / (time.perf_counter() - start), tokens


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
    from converter.data import added_special_tokens, token_windows
    from converter.export import float_graph
    from converter.kvcache import graph_kv_layout
    from converter.load import load_reference
    from converter.recipe import Export, load_recipe
    from converter.runners import onnxruntime_session

    recipe = load_recipe(RECIPE)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = shipped_artifact(args.artifact, RECIPE, Path(tmp))
        int8_path = artifact / "model.onnx"
        if graph_kv_layout(int8_path) is None:
            raise SystemExit(f"{int8_path} has no KV cache inputs (export.kv_cache: false)")
        model = load_reference(recipe.path(recipe.recipe.source.path), recipe.recipe.source)
        # the artifact's graph passes (constant folding, RMSNorm fusable), nothing quantized
        fp32_path = float_graph(model, Path(tmp) / "fp32.onnx", Export(kv_cache=True))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(artifact))
        windows = token_windows(recipe, recipe.recipe.parity.eval, tokenizer, shuffle=False)
        # one stream of text, after the BOS the tokenizer starts every text with (if any)
        text = added_special_tokens(tokenizer)[0] + [int(t) for t in windows.input_ids.reshape(-1)]
        if max(args.prompt_tokens) > len(text):
            raise SystemExit(f"--prompt-tokens {max(args.prompt_tokens)}: the evaluation text holds {len(text)}")
        prompts = {n: text[:n] for n in args.prompt_tokens}
        del model
        sessions = {}
        for name, path in (("fp32", fp32_path), ("int8", int8_path)):
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
        pairs = [i8 / f32 for f32, i8 in zip(rates[n, "fp32"], rates[n, "int8"])]
        per_length[n] = {
            "tokens_per_s_median": {name: statistics.median(rates[n, name]) for name in sessions},
            "tokens_per_s_all": {name: rates[n, name] for name in sessions},
            "int8_over_fp32": statistics.median(pairs), "int8_over_fp32_pairs": pairs,
            "int8_over_fp32_range": [min(pairs), max(pairs)],
            "greedy_token_agreement_this_prompt":
                sum(a == b for a, b in zip(tokens[n, "fp32"], tokens[n, "int8"])) / len(tokens[n, "fp32"]),
        }
    results = {
        **stamp(),
        "note": args.note,
        "batch": 1, "threads": args.threads, "new_tokens": args.new_tokens, "runs": args.runs,
        "prompt_tokens": per_length,
    }
    lines = [f"SmolLM2-135M-Instruct decode with the KV cache, {results['machine']}, {results['date']}"
             + (f" ({args.note})" if args.note else ""), "",
             f"| ONNX Runtime, batch 1, {args.threads} threads, {args.new_tokens} decode steps | prompt | "
             f"median of {args.runs} (interleaved) | vs FP32: median of pairs [min, max] |", "|---|---|---|---|"]
    for n, r in per_length.items():
        low, high = r["int8_over_fp32_range"]
        lines += [f"| FP32 ONNX (KV cache) | {n} tokens | {r['tokens_per_s_median']['fp32']:.1f} tokens/s | 1.00x |",
                  f"| INT8 QDQ artifact (KV cache) | {n} tokens | {r['tokens_per_s_median']['int8']:.1f} tokens/s | "
                  f"{r['int8_over_fp32']:.2f}x [{low:.2f}, {high:.2f}] |"]
    table = "\n".join(lines) + "\n"
    write_results("decode", results, table)
    print(table)


if __name__ == "__main__":
    main()
