"""Accuracy methods side by side, on one protocol: which change to static W8A8 helps on unseen text?

    .venv/bin/python bench/methods.py [--recipe recipes/smollm2-135m-cpu.yaml] [--only NAME ...]

Each row is the recipe with `--set` overrides, run through the converter's own stage functions:
calibrate (with the recipe's decode steps), alpha search, smoothing, re-calibration, ranges, plan,
sensitivity fallback. The plan is then applied as fake quant in PyTorch (integer sums, as the int8
kernels compute; equal to ONNX Runtime's int8 graph to ~1e-6 of the logits' size, tests/quant/test_quantize.py),
so a row costs seconds instead of a conversion. Fused attention and the export are not involved: the
shipped artifact's own figures are in its parity report and bench/results/accuracy.md.

Measured on every `parity.eval` set of the recipe (held out: nothing a row chooses reads them), against
the FP32 model (the dequantized GGUF of the packaged checkpoint): perplexity ratio, KL, top-1, and
stepwise agreement on the recipe's generation prompts (the candidate fed FP32's own greedy tokens).
Diagnostic rows keep some activations in float ("float activations: ..."): where the error comes from.
Prints a Markdown table and writes bench/results/methods.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from cli_run import RESULTS, ROOT, SMOLLM2_FP32, stamp

ROWS: dict[str, list[str]] = {
    "shipped recipe": [],
    "alpha 0.7 (the selection text's choice)": ["smoothing.alpha=0.7"],
    "per-group alpha search": ["smoothing.search=per_group"],
    "per-block alpha search": ["smoothing.search=per_block"],
    "range: percentile 99.99": ["quantization.activations.range=percentile",
                                "quantization.activations.percentile=99.99"],
    "range: mse": ["quantization.activations.range=mse"],
    "mixed calibration (+ clinical-calibration.txt)": [
        "calibration.files=[data/gpl-3.0.txt, data/clinical-calibration.txt]", "calibration.num_samples=64"],
    "sensitivity fallback (<= 10% MACs float)": ["quantization.fallback.enabled=true"],
    "mlp_down alpha 0.65 (the selection text's choice), other groups 0.8": ["smoothing.group_alpha.mlp_down=0.65"],
}
# The ceiling of 8-bit weights: weight-only int8 without smoothing (smoothing only helps activations).
CEILING = ("weight-only int8, no smoothing (the ceiling of 8-bit weights)", ["smoothing.enabled=false"], ("",))
# Diagnostic rows: the shipped recipe with the activations of some linears left in float (weights int8).
FLOAT_ACTS = {
    "float activations: all (weight-only int8, weights smoothed at the recipe's alpha)": ("",),
    "float activations: q/k/v": ("q_proj", "k_proj", "v_proj"),
    "float activations: o_proj": ("o_proj",),
    "float activations: gate/up": ("gate_proj", "up_proj"),
    "float activations: down_proj": ("down_proj",),
    "float activations: lm_head": ("lm_head",),
}


ROW_NAMES = {*ROWS, *FLOAT_ACTS, CEILING[0]}


class WeightOnlyLinear(torch.nn.Module):
    """A linear with int8 (per-channel) weights and float activations."""

    def __init__(self, linear: torch.nn.Linear, weight_scale: torch.Tensor):
        super().__init__()
        from converter.quant.quantize import fake_quantize_weight

        self.weight = torch.nn.Parameter(fake_quantize_weight(linear.weight, weight_scale), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class FloatLogits(torch.nn.Module):
    """A model whose logits come back as float32 (a bfloat16 model's, for the runners)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits = out.logits.float()
        return out


def plan_model(recipe, model, calib, select, before=None):
    """The converter's front end without the export, in place on `model` (smoothed): returns (plan, share
    of linear MACs in float, the first calibration's stats: pass them back for a row that calibrates alike)."""
    from converter.models.archs import arch_spec, block_linear_names, spec_from_recipe
    from converter.quant.calibrate import activation_ranges, collect_input_amax
    from converter.quant.quantize import plan_quantization, split_by_exclusions
    from converter.quant.alpha_search import choose_alphas
    from converter.quant.sensitivity import sensitivity_fallback, without
    from converter.quant.smooth import smooth

    r = recipe.recipe
    bs = r.calibration.batch_size
    spec = arch_spec(model, spec_from_recipe(r.architecture))
    linears = block_linear_names(model, spec)
    quantized, _ = split_by_exclusions(linears, r.quantization.exclude)
    before = before or collect_input_amax(model, quantized, calib, bs)
    cfg, alphas, _ = choose_alphas(model, spec, r.smoothing, r.quantization, linears, quantized, before.amax, select, bs)
    report = smooth(model, before.amax, cfg, spec, alphas)
    stats = collect_input_amax(model, quantized, calib, bs, "re-calibrate") if report.groups else before
    ranges, _ = activation_ranges(model, stats, calib, bs, r.quantization.activations)
    plan = plan_quantization(model, linears, ranges, r.quantization)
    float_share = 0.0
    if r.quantization.fallback.enabled:
        fallback = sensitivity_fallback(model, plan, select, bs, r.quantization.fallback)
        plan, float_share = without(plan, fallback.fallback), fallback.float_mac_share
    return plan, float_share, before


class Replay:
    """A runner that returns logits computed once (the FP32 reference's, shared by every row)."""

    def __init__(self, logits: list):
        self.logits = logits

    def __enter__(self):
        self._next = iter(self.logits)
        return self

    def __exit__(self, *exc):
        return False

    def infer(self, feed):
        return {"logits": next(self._next)}


def apply(model, plan, float_acts: tuple[str, ...]):
    """Fake quant of `plan`, except linears whose name ends with one of `float_acts` ("" = all): int8
    weights, float activations."""
    from converter.quant.quantize import apply_fake_quant

    keep = {n: q for n, q in plan.linears.items() if any(n.endswith(s) for s in float_acts)} if float_acts else {}
    plan.linears = {n: q for n, q in plan.linears.items() if n not in keep}
    apply_fake_quant(model, plan)
    for name, quant in keep.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, WeightOnlyLinear(getattr(owner, attr), quant.weight_scale))
    return model


def reference_logits(model, recipe, texts) -> list[list]:
    """The FP32 model's logits on every evaluation window, per set, batched as `evaluate` feeds them."""
    from converter.targets.runners import TorchRunner

    out = []
    for s, windows in zip(recipe.recipe.parity.sets, texts.windows):
        with TorchRunner(model, "fp32") as runner:
            out.append([runner.infer({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})["logits"].copy()
                        for ids, mask in windows.batches(s.batch_size)])
    return out


def measure(reference_logits, candidate, recipe, texts, references) -> dict:
    """Per evaluation set: parity metrics and stepwise agreement of `candidate` against the reference."""
    from converter.parity.generation import stepwise_agreement, torch_batch_logits
    from converter.parity.metrics import evaluate
    from converter.targets.runners import TorchRunner

    out = {}
    for s, windows, prompts, ref_tokens, logits in zip(recipe.recipe.parity.sets, texts.windows, texts.prompts,
                                                       references, reference_logits):
        m = evaluate(Replay(logits), TorchRunner(candidate, "candidate"), windows, s.batch_size)
        out[s.name] = {"ppl_ratio": m.ppl_ratio, "kl": m.kl_mean, "top1": m.top1_agreement,
                       "reference_ppl": m.reference_ppl,
                       "stepwise": stepwise_agreement(None, prompts, ref_tokens, batched=torch_batch_logits(candidate))
                       if prompts else None}
    return out


def commit() -> str:
    """The checkout's commit (short), "+" when the working tree differs from it."""
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return (head or "unknown") + ("+" if dirty else "")


def markdown(results: dict) -> str:
    sets = results["sets"]
    head = " | ".join(f"{s}: ppl ratio | KL | stepwise" for s in sets)
    lines = [f"{results['recipe']} ({SMOLLM2_FP32 if 'smollm2' in results['recipe'] else 'FP32 = the checkpoint widened to FP32'}), "
             f"fake-quant W8A8 in PyTorch, {results['machine']}, {results['date']}", "",
             f"| row | {head} | MACs in float | s | commit |", "|---|" + "---|" * (3 * len(sets) + 3)]
    for name, row in results["rows"].items():
        cells = " | ".join(f"x{row['sets'][s]['ppl_ratio']:.3f} | {row['sets'][s]['kl']:.3f} | "
                           + (f"{row['sets'][s]['stepwise']:.3f}" if row["sets"][s]["stepwise"] is not None else "-")
                           for s in sets)
        lines.append(f"| {name} | {cells} | {100 * row['float_mac_share']:.1f}% | {row['seconds']:.0f} | "
                     f"{row.get('commit', '?')} |")
    bf16 = results.get("bf16")
    if bf16:
        lines += ["", "BF16 (the yardstick: the checkpoint cast to bfloat16, no int8): " + "; ".join(
            f"{s} x{bf16[s]['ppl_ratio']:.3f}, KL {bf16[s]['kl']:.3f}, stepwise {bf16[s]['stepwise']:.3f}" for s in sets)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "smollm2-135m-cpu.yaml")
    parser.add_argument("--only", nargs="*", help="re-run only the rows whose name contains one of these; the "
                        "results file keeps its other rows (each row records its commit and date)")
    parser.add_argument("--name", default="methods", help="results file name (bench/results/<name>.*)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())

    from converter.models.text import token_windows, window_wrap
    from converter.parity.evalsets import load_eval_inputs
    from converter.parity.generation import greedy_torch_many
    from converter.models.load import load
    from converter.recipe import load_recipe

    base = load_recipe(args.recipe)
    loaded = load(base)
    wrap = window_wrap(loaded.tokenizer, "decoder")
    texts = load_eval_inputs(base, loaded.tokenizer, wrap, True)
    reference = loaded.model.eval()
    references = [greedy_torch_many(reference, p, base.recipe.parity.generation.max_new_tokens) if p else []
                  for p in texts.prompts]
    path = RESULTS / f"{args.name}.json"
    kept = json.loads(path.read_text()) if args.only and path.is_file() else {}
    results = {"recipe": str(args.recipe.relative_to(ROOT)), **stamp(),
               "sets": [s.name for s in base.recipe.parity.sets], "rows": {}}
    ref_logits = reference_logits(reference, base, texts)
    if not args.only:  # the yardstick first: a run stopped early still has it
        results["bf16"] = measure(ref_logits, FloatLogits(copy.deepcopy(reference).to(torch.bfloat16)), base, texts,
                                  references)
    # the shipped recipe first, then its diagnostic rows (they share its plan), then the other methods
    first, *others = ROWS.items()
    rows = {first[0]: (first[1], ()), **{n: ([], f) for n, f in FLOAT_ACTS.items()}, **{n: (o, ()) for n, o in others},
            CEILING[0]: CEILING[1:]}
    planned: dict[tuple, tuple] = {}  # overrides -> (smoothed model, plan, float share): diagnostic rows share one
    calibrated: dict[str, object] = {}  # calibration section -> first calibration's stats
    for name, (overrides, float_acts) in rows.items():
        if args.only and not any(k in name for k in args.only):
            continue
        start = time.perf_counter()
        if tuple(overrides) not in planned:
            recipe = load_recipe(args.recipe, overrides)
            r = recipe.recipe
            calib = token_windows(recipe, r.calibration, loaded.tokenizer, shuffle=True, wrap=wrap)
            if r.export.kv_cache:
                calib = calib.with_decode(r.calibration.decode_windows, r.calibration.decode_steps)
            select = token_windows(recipe, r.selection, loaded.tokenizer, shuffle=True, wrap=wrap) if r.selection else calib
            smoothed = copy.deepcopy(reference)
            key = json.dumps([r.calibration.model_dump(mode="json"), r.quantization.exclude])
            plan, float_share, calibrated[key] = plan_model(recipe, smoothed, calib, select, calibrated.get(key))
            planned = {tuple(overrides): (smoothed, plan, float_share)}  # keep one planned model in memory
        smoothed, plan, float_share = planned[tuple(overrides)]
        candidate = apply(copy.deepcopy(smoothed), copy.copy(plan), float_acts)
        results["rows"][name] = {"commit": commit(), "date": stamp()["date"], "machine": stamp()["machine"],
                                 "overrides": overrides, "float_activations": list(float_acts),
                                 "float_mac_share": float_share,
                                 "sets": measure(ref_logits, candidate, base, texts, references),
                                 "seconds": time.perf_counter() - start}
        del candidate
        print(f"{name}: {json.dumps(results['rows'][name]['sets'])}", file=sys.stderr, flush=True)
        save(path, results, kept)
    save(path, results, kept)
    print(markdown(results))


def save(path: Path, results: dict, kept: dict) -> None:
    """Write the results so far (after every row: a stopped run keeps what it measured); rows of `kept`
    (the file before an --only run) that were not re-run stay, in the file's order."""
    if kept.get("recipe") == results["recipe"]:  # rows this script no longer defines are dropped
        rows = {n: r for n, r in kept["rows"].items() if n in ROW_NAMES}
        results = {**results, "rows": {**rows, **results["rows"]}, "bf16": results.get("bf16") or kept.get("bf16")}
    path.write_text(json.dumps(results, indent=1))
    path.with_suffix(".md").write_text(markdown(results))


if __name__ == "__main__":
    main()
