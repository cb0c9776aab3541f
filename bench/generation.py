"""Greedy token agreement with the FP32 original: the INT8 artifact next to yardsticks of known precision.

    .venv/bin/python bench/generation.py [--artifact DIR] [--max-new-tokens 32] [--prompts 16]

Without --artifact the shipped recipe is converted first (through the real CLI). The reference is
the PyTorch FP32 checkpoint, greedy with its own KV cache. Candidates:
  * the same checkpoint cast to FP16 and to BF16 (PyTorch);
  * weight-only rounding ladders (PyTorch): every linear's FP32 weight, lm_head included, rounded
    per output channel to symmetric 8-, 10- and 12-bit integers (round to nearest, no smoothing),
    activations left in FP32: how much agreement the weight precision alone allows;
  * the checkpoint exported to FP32 ONNX with the recipe's KV cache (ONNX Runtime, prefill then
    decode steps): the measuring path itself, with nothing quantized;
  * the checkpoint smoothed as the recipe smooths it (calibration with decode steps, the recipe's
    alpha), in FP32 (PyTorch): smoothing alone, with nothing quantized;
  * the INT8 artifact with its activation QuantizeLinear/DequantizeLinear pairs removed (ONNX
    Runtime): its own smoothed int8 weights, FP32 activations;
  * the INT8 artifact itself (ONNX Runtime: prefill, then one-token decode steps through its KV cache).
Two prompt sets: the evaluation text (the recipe's first parity.eval set) cut into 128-token windows,
each window's first 32 tokens a prompt (cut mid-sentence; the recipe's own 256-token windows give
only 8 from this text), and recipes/data/clinical-questions.txt in the chat template (how an
instruction-tuned model is used).
Token, prefix and stepwise agreement are defined in converter/parity/generation.py. Writes
bench/results/generation.{json,md}, which the README quotes.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

from cli_run import SMOLLM2_FP32, shipped_artifact, stamp, write_results

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_BITS = (8, 10, 12)
RECIPE = ROOT / "recipes" / "smollm2-135m-cpu.yaml"
QUESTIONS = ROOT / "recipes" / "data" / "clinical-questions.txt"


def rounded_weights(model, bits: int):
    """A copy of `model` whose every nn.Linear weight (an untied copy of a tied lm_head included) is
    rounded to symmetric `bits`-bit integers per output channel: the converter's own weight rounding
    (absmax scale, round half to even) on a grid of 2**(bits-1) - 1 steps a side."""
    import torch

    from converter.quant.quantize import fake_quantize_weight, weight_scales

    copied = copy.deepcopy(model)
    top = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for module in copied.modules():
            if isinstance(module, torch.nn.Linear):
                weight = module.weight.detach().clone()
                module.weight = torch.nn.Parameter(fake_quantize_weight(weight, weight_scales(weight, top), top))
    return copied


def smoothed_fp32(recipe, model, tokenizer):
    """A copy of `model` smoothed as the pipeline smooths it for `recipe` (same calibration windows,
    decode steps included, and alphas), left in FP32."""
    from converter.models.archs import arch_spec, block_linear_names
    from converter.models.text import token_windows, window_wrap
    from converter.quant.alpha_search import choose_alphas
    from converter.quant.calibrate import collect_input_amax
    from converter.quant.quantize import split_by_exclusions
    from converter.quant.smooth import smooth

    r = recipe.recipe
    copied = copy.deepcopy(model)
    calib = token_windows(recipe, r.calibration, tokenizer, shuffle=True, wrap=window_wrap(tokenizer, "decoder"))
    if r.export.kv_cache:
        calib = calib.with_decode(r.calibration.decode_windows, r.calibration.decode_steps)
    spec = arch_spec(copied)
    linears = block_linear_names(copied, spec)
    quantized, _ = split_by_exclusions(linears, r.quantization.exclude)
    amax = collect_input_amax(copied, quantized, calib, r.calibration.batch_size).amax
    cfg, alphas, _ = choose_alphas(copied, spec, r.smoothing, r.quantization, linears, quantized, amax, calib,
                                   r.calibration.batch_size)
    smooth(copied, amax, cfg, spec, alphas)
    return copied


def without_activation_qdq(src: Path, dst: Path) -> Path:
    """`src` with every activation QuantizeLinear -> DequantizeLinear pair removed (the MatMul reads
    the float activation again); the weights' DequantizeLinear nodes stay. Written to `dst`."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    model = ir.load(src)
    pairs = [(node.inputs[0].producer(), node) for node in model.graph
             if node.op_type == "DequantizeLinear" and node.inputs[0].producer() is not None
             and node.inputs[0].producer().op_type == "QuantizeLinear"]
    for quant, dequant in pairs:
        dequant.outputs[0].replace_all_uses_with(quant.inputs[0])
    RemoveUnusedNodesPass()(model)  # the pairs, then their scale and zero-point initializers
    dst.parent.mkdir(parents=True, exist_ok=True)
    ir.external_data.load_to_model(model)  # bring external tensors in: ir.save writes them afresh
    ir.save(model, dst, external_data=f"{dst.name}.data")
    print(f"removed {len(pairs)} activation Q/DQ pairs", file=sys.stderr)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="an artifact folder (default: convert the shipped recipe)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per set (at most 16: the evaluation "
                        "windows and the questions file hold 16)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoTokenizer

    from converter.export.exporter import export_fp32
    from converter.models.archs import arch_spec
    from converter.models.text import token_windows, window_wrap
    from converter.parity.generation import (compare_tokens, generation_prompts, greedy_graph, greedy_torch, sequence_logits,
                                      session_step, stepwise_agreement)
    from converter.export.kv_graph import graph_kv_layout
    from converter.models.load import load_reference
    from converter.recipe import Generation, load_recipe
    from converter.targets.runners import onnxruntime_session

    torch.set_num_threads(args.threads)
    recipe = load_recipe(RECIPE)
    r = recipe.recipe
    n = args.max_new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        artifact = shipped_artifact(args.artifact, RECIPE, Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(str(artifact))
        short = r.parity.sets[0].text().model_copy(update={"seq_len": 128, "num_samples": args.prompts})
        windows = token_windows(recipe, short, tokenizer, shuffle=False, wrap=window_wrap(tokenizer, "decoder"))
        questions = Generation(prompts_file=str(QUESTIONS), chat_template=True, prompts=args.prompts)
        cut = r.parity.generation.model_copy(update={"prompts": args.prompts})
        prompt_sets = {
            "evaluation windows": generation_prompts(windows, cut, tokenizer, recipe.base_dir),
            "clinical questions (chat)": generation_prompts(None, questions, tokenizer, ROOT),
        }
        model = load_reference(recipe.path(r.source.path), r.source)
        int8_path = artifact / "model.onnx"
        layout = graph_kv_layout(int8_path)
        int8 = session_step(onnxruntime_session(int8_path, threads=args.threads))
        weights_only_path = without_activation_qdq(int8_path, Path(tmp) / "weights-only" / "model.onnx")
        weights_only = session_step(onnxruntime_session(weights_only_path, threads=args.threads))
        (Path(tmp) / "fp32").mkdir()
        fp32_path = export_fp32(model, Path(tmp) / "fp32" / "model.onnx", r.export, arch_spec(model))
        fp32 = session_step(onnxruntime_session(fp32_path, threads=args.threads))
        def torch_candidate(m):
            @torch.no_grad()
            def logits_of(ids):
                return m(input_ids=torch.tensor([ids])).logits[0].float().numpy()
            return lambda p: greedy_torch(m, p, n), logits_of

        def graph_candidate(step):
            return lambda p: list(greedy_graph(step, layout, p, n)), lambda ids: sequence_logits(step, layout, ids)

        candidates = {  # name: (greedy continuation of a prompt, logits of a sequence)
            "FP32 ONNX export with the KV cache (ONNX Runtime)": graph_candidate(fp32),
            "smoothed as the recipe smooths, FP32 (PyTorch)": torch_candidate(smoothed_fp32(recipe, model, tokenizer)),
            "PyTorch FP16": torch_candidate(copy.deepcopy(model).half()),
            "PyTorch BF16": torch_candidate(copy.deepcopy(model).bfloat16()),
            **{f"weights rounded to int{b} per channel, no smoothing, FP32 activations (PyTorch)":
               torch_candidate(rounded_weights(model, b)) for b in WEIGHT_BITS},
            "INT8 artifact without activation Q/DQ: its int8 weights, FP32 activations (ONNX Runtime)":
                graph_candidate(weights_only),
            "INT8 artifact (ONNX Runtime)": graph_candidate(int8),
        }
        rows: dict[str, dict] = {name: {} for name in candidates}
        for set_name, prompts in prompt_sets.items():
            reference = [greedy_torch(model, p, n) for p in prompts]
            for name, (generate, logits_of) in candidates.items():
                metrics = compare_tokens(reference, [generate(p) for p in prompts], len(prompts[0]))
                rows[name][set_name] = {"token_agreement": metrics.token_agreement,
                                        "prefix_agreement": metrics.prefix_agreement,
                                        "stepwise_agreement": stepwise_agreement(logits_of, prompts, reference),
                                        "first_divergence": metrics.first_divergence}
                print(f"{set_name:28s} {name:30s} {metrics.token_agreement:.3f} "
                      f"{rows[name][set_name]['stepwise_agreement']:.3f}", file=sys.stderr, flush=True)
    results = {
        **stamp(),
        "recipe": RECIPE.name, "new_tokens": n,
        "prompts": {name: len(p) for name, p in prompt_sets.items()},
        "rows": rows,
    }
    sets = list(prompt_sets)
    lines = [f"SmolLM2-135M-Instruct greedy agreement with PyTorch FP32 ({SMOLLM2_FP32}), "
             f"{n} new tokens, {results['date']} "
             f"({RECIPE.name} artifact)", "",
             "| candidate | " + " | ".join(f"{s} ({len(prompt_sets[s])}): token / prefix / stepwise agreement"
                                         for s in sets) + " |",
             "|---|" + "---|" * len(sets)]
    for name, row in rows.items():
        cells = [f"{row[s]['token_agreement']:.2f} / {row[s]['prefix_agreement']:.2f} / "
                 f"{row[s]['stepwise_agreement']:.3f}" for s in sets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    write_results("generation", results, table)
    print(table)


if __name__ == "__main__":
    main()
