"""Re-check a decoder recipe's fixed smoothing alpha on its selection text (never an evaluation text).

    .venv/bin/python bench/selection.py [--recipe recipes/smollm2-135m-cpu.yaml] [--grid 0.6 0.7 0.8 0.9]
                                        [--calibration-windows N] [--group mlp_down]

For each alpha: a copy of the model smoothed with the calibration maxima, static ranges re-calibrated
on the calibration windows, every quantized linear fake-quantized as the recipe asks; scored against
the float model on the recipe's `selection` windows (mean KL per token and perplexity ratio, as the
sensitivity fallback scores). The KV-cache decode-step calibration is left out (prefill windows only),
which keeps each alpha to two passes over the calibration windows; `--calibration-windows N` calibrates
on the recipe's first N (shuffled) windows only, a cheaper and coarser check.
`--group NAME` sweeps that smoothing group's own alpha (`smoothing.group_alpha`) with every other
group at the recipe's alpha.
Prints a Markdown table and writes bench/results/selection.{json,md} (selection-NAME.* with --group).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from cli_run import stamp, write_results

ROOT = Path(__file__).resolve().parents[1]


def sweep(recipe_path: Path, grid: list[float], calibration_windows: int | None = None,
          group: str | None = None) -> dict:
    from converter.models.archs import arch_spec, block_linear_names
    from converter.models.load import load
    from converter.models.text import token_windows, window_wrap
    from converter.quant.calibrate import activation_ranges, collect_input_amax
    from converter.quant.quantize import apply_fake_quant, plan_quantization, split_by_exclusions
    from converter.quant.sensitivity import _Scorer
    from converter.quant.smooth import smooth
    from converter.recipe import load_recipe

    overrides = [f"calibration.num_samples={calibration_windows}"] if calibration_windows else []
    recipe = load_recipe(recipe_path, overrides)
    r = recipe.recipe
    if r.selection is None:
        raise SystemExit(f"{recipe_path}: no selection section")
    loaded = load(recipe)
    model, wrap = loaded.model, window_wrap(loaded.tokenizer, "decoder")
    calib = token_windows(recipe, r.calibration, loaded.tokenizer, shuffle=True, wrap=wrap)
    selection = token_windows(recipe, r.selection, loaded.tokenizer, shuffle=True, wrap=wrap)
    spec = arch_spec(model)
    linears = block_linear_names(model, spec)
    quantized, _ = split_by_exclusions(linears, r.quantization.exclude)
    bs = r.calibration.batch_size
    before = collect_input_amax(model, quantized, calib, bs)
    scorer = _Scorer(model, selection, r.selection.batch_size)
    rows = {}
    for alpha in grid:
        candidate = copy.deepcopy(model)
        update = {"group_alpha": {**r.smoothing.group_alpha, group: alpha}} if group else {"alpha": alpha}
        smooth(candidate, before.amax, r.smoothing.model_copy(update=update), spec)
        stats = collect_input_amax(candidate, quantized, calib, bs, "re-calibrate")
        ranges, _ = activation_ranges(candidate, stats, calib, bs, r.quantization.activations)
        apply_fake_quant(candidate, plan_quantization(candidate, linears, ranges, r.quantization))
        errors = scorer(candidate)
        rows[f"{alpha:g}"] = {"kl": errors.kl, "ppl_ratio": errors.ppl_ratio}
        print(f"alpha {alpha:g}: KL {errors.kl:.4f}, ppl x{errors.ppl_ratio:.4f}", flush=True)
        del candidate
    return {"recipe": str(recipe_path.relative_to(ROOT)), "group": group,
            "recipe_alpha": r.smoothing.group_alpha.get(group, r.smoothing.alpha),
            "selection": r.selection.model_dump(), "selection_windows": len(selection.input_ids),
            "calibration_windows": len(calib.input_ids), "alphas": rows,
            "best": min(rows, key=lambda a: rows[a]["kl"])}


def markdown(results: dict) -> str:
    what = f"{results['group']}'s own alpha (every other group at the recipe's)" if results.get("group") else "alpha"
    lines = [f"{results['recipe']}: {what} re-checked on the selection text {', '.join(results['selection']['files'])} "
             f"({results['selection_windows']} windows), static ranges calibrated on {results['calibration_windows']} "
             f"calibration windows (prefill only); {results['machine']}, {results['date']}", "",
             "| alpha | KL(float \\|\\| fake-quant W8A8), mean per token | perplexity ratio |", "|---|---|---|"]
    for alpha, row in results["alphas"].items():
        mark = " (recipe)" if float(alpha) == results["recipe_alpha"] else ""
        lines.append(f"| {alpha}{mark} | {row['kl']:.4f} | x{row['ppl_ratio']:.4f} |")
    return "\n".join(lines + ["", f"Least KL: alpha {results['best']}."]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "smollm2-135m-cpu.yaml")
    parser.add_argument("--grid", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--calibration-windows", type=int, default=None)
    parser.add_argument("--group", default=None, help="sweep this smoothing group's own alpha (smoothing.group_alpha)")
    args = parser.parse_args()
    results = {**stamp(), **sweep(args.recipe.resolve(), args.grid, args.calibration_windows, args.group)}
    write_results(f"selection-{args.group}" if args.group else "selection", results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
