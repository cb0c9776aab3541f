"""Greedy token agreement with the FP32 original: the INT8 artifact next to FP16 and BF16 references.

    .venv/bin/python bench/generation.py [--artifact DIR] [--max-new-tokens 32]

Without --artifact the shipped recipe is converted first (through the real CLI). The reference is
the PyTorch FP32 checkpoint, greedy with its own KV cache; the candidates are the same checkpoint
cast to FP16 and to BF16 (PyTorch), and the INT8 artifact in ONNX Runtime (prefill, then one-token
decode steps through its KV cache). Two prompt sets: the recipe's generation prompts (the first 32
tokens of evaluation windows, cut mid-sentence) and recipes/data/clinical-questions.txt in the
chat template (how an instruction-tuned model is used). Token and prefix agreement are defined in
converter/generation.py. Writes bench/results/generation.{json,md}, which the README quotes.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

from cli_run import shipped_artifact, stamp, write_results

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-cpu.yaml"
QUESTIONS = ROOT / "recipes" / "data" / "clinical-questions.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="an artifact folder (default: convert the shipped recipe)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoTokenizer

    from converter.data import token_windows
    from converter.generation import compare_tokens, generation_prompts, greedy_graph, greedy_torch, session_step
    from converter.kvcache import graph_kv_layout
    from converter.load import load_reference
    from converter.recipe import Generation, load_recipe
    from converter.runners import onnxruntime_session

    torch.set_num_threads(args.threads)
    recipe = load_recipe(RECIPE)
    r = recipe.recipe
    n = args.max_new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        artifact = shipped_artifact(args.artifact, RECIPE, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(str(artifact))
        windows = token_windows(recipe, r.parity.eval, tokenizer, shuffle=False)
        prompt_sets = {
            "evaluation windows": generation_prompts(windows, r.parity.generation, tokenizer, recipe.base_dir),
            "clinical questions (chat)": generation_prompts(
                None, Generation(prompts_file=str(QUESTIONS), chat_template=True), tokenizer, ROOT),
        }
        model = load_reference(recipe.path(r.source.path), r.source)
        int8_path = artifact / "model.onnx"
        session, layout = onnxruntime_session(int8_path, threads=args.threads), graph_kv_layout(int8_path)
        candidates = {
            "PyTorch FP16": lambda p, m=copy.deepcopy(model).half(): greedy_torch(m, p, n),
            "PyTorch BF16": lambda p, m=copy.deepcopy(model).bfloat16(): greedy_torch(m, p, n),
            "INT8 artifact (ONNX Runtime)": lambda p: list(greedy_graph(session_step(session), layout, p, n)),
        }
        rows: dict[str, dict] = {name: {} for name in candidates}
        for set_name, prompts in prompt_sets.items():
            reference = [greedy_torch(model, p, n) for p in prompts]
            for name, generate in candidates.items():
                metrics = compare_tokens(reference, [generate(p) for p in prompts], len(prompts[0]))
                rows[name][set_name] = {"token_agreement": metrics.token_agreement,
                                        "prefix_agreement": metrics.prefix_agreement,
                                        "first_divergence": metrics.first_divergence}
                print(f"{set_name:28s} {name:30s} {metrics.token_agreement:.3f}", file=sys.stderr, flush=True)
    results = {
        **stamp(),
        "recipe": RECIPE.name, "new_tokens": n,
        "prompts": {name: len(p) for name, p in prompt_sets.items()},
        "rows": rows,
    }
    sets = list(prompt_sets)
    lines = [f"SmolLM2-135M-Instruct greedy agreement with PyTorch FP32, {n} new tokens, {results['date']} "
             f"({RECIPE.name} artifact)", "",
             "| candidate | " + " | ".join(f"{s} ({len(prompt_sets[s])}): token / prefix agreement" for s in sets) + " |",
             "|---|" + "---|" * len(sets)]
    for name, row in rows.items():
        cells = [f"{row[s]['token_agreement']:.2f} / {row[s]['prefix_agreement']:.2f}" for s in sets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    write_results("generation", results, table)
    print(table)


if __name__ == "__main__":
    main()
