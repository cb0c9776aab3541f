"""Accuracy side by side: our W8A8 levels against ONNX Runtime's own quantizers, on two texts.

    .venv/bin/python bench/accuracy.py [--peer-windows 8] [--skip-peers] [--only NAME ...]

Protocol (issue 3): SmolLM2-135M-Instruct; calibration = the GPL-3 text in 256-token windows;
evaluation = perplexity over 256-token windows of the Apache-2.0 text (the calibration domain:
license English) and of the synthetic clinical reports (out of domain). Every perplexity here is
measured the same way, with ONNX Runtime on the exported graph, against the FP32 ONNX export.

Ours: `convert.py` on a shipped recipe with `--set` overrides (one subprocess per row); the
clinical recipe differs from the default one by its calibration text and its sensitivity fallback.
Peers: `onnxruntime.quantization.quantize_static` (QDQ, S8S8 symmetric, per-channel weights) with
MinMax and Percentile calibration, as documented and with MatMul outputs left unquantized, plus
`quantize_dynamic`, all after ORT's `quant_pre_process`; ORT's SmoothQuant option is tried and
reported if it does not install.
Prints one Markdown table and writes bench/results/accuracy.{json,md}, which the README quotes.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cli_run import RESULTS, SMOLLM2_FP32, no_gates, run_convert, stamp, write_results

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-cpu.yaml"
CLINICAL = ROOT / "recipes" / "smollm2-135m-clinical-cpu.yaml"
TEXTS = {"license (in domain)": "data/apache-2.0.txt", "clinical": "data/clinical-reports.txt"}
O1 = "quantization.activations={mode: dynamic, granularity: per_token}"
O2 = "quantization.activations={mode: dynamic, granularity: per_tensor}"
FALLBACK = ["quantization.fallback.enabled=true", "quantization.fallback.target_kl=null",
            "quantization.fallback.target_ppl_ratio=1.005"]
OURS = {  # name -> (recipe, overrides), most telling first; generation parity off: this is about perplexity
    "ours O3 static, + clinical calibration text + per-group alpha search + fallback (smollm2-135m-clinical-cpu.yaml)": (CLINICAL, []),
    "ours O3 static, + clinical calibration text, global alpha 0.8 + fallback": (CLINICAL, ["smoothing.search=off"]),
    "ours O1 dynamic per-token, no smoothing (CPU only)": (RECIPE, [O1, "smoothing.enabled=false"]),
    "ours O3 static, SmoothQuant 0.8 (smollm2-135m-cpu.yaml)": (RECIPE, []),
    "ours O3 static, SmoothQuant 0.8 + fallback (<= 10% MACs float)": (RECIPE, FALLBACK),
    "ours O2 dynamic per-tensor, SmoothQuant 0.8 (CPU only)": (RECIPE, [O2]),
}

def windows(recipe, file: str, tokenizer, limit: int | None = None):
    from converter.models.text import token_windows, window_wrap

    data = recipe.recipe.parity.sets[0].text().model_copy(update={"files": [file], "num_samples": limit or 10_000})
    return token_windows(recipe, data, tokenizer, shuffle=False,
                         wrap=window_wrap(tokenizer, "decoder")).input_ids.numpy()


def perplexity(path: Path, texts: dict[str, np.ndarray]) -> dict[str, float]:
    """Perplexity of the graph at `path` on each text, every window a prefill (an empty past for a KV graph)."""
    from converter.export.kv_graph import graph_kv_layout, prefill_feed
    from converter.targets.runners import onnxruntime_session

    sess, layout = onnxruntime_session(path, threads=2), graph_kv_layout(path)
    out = {}
    for name, ids in texts.items():
        nll = count = 0.0
        for row in ids:
            feed = prefill_feed(row[None], np.ones_like(row[None]), layout)
            logits = sess.run(["logits"], feed)[0][0].astype(np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll -= float(logp[np.arange(len(row) - 1), row[1:]].sum())
            count += len(row) - 1
        out[name] = math.exp(nll / count)
    return out


def rounding_spread(path: Path, texts: dict[str, np.ndarray], reference: dict[str, float], realizations: int,
                    work: Path) -> dict[str, list[float]] | None:
    """Perplexity ratios of `realizations` copies of a static artifact whose activation scales differ
    by parts per million (factors 1 +- j * 1e-6). Such a change moves a handful of activations across
    a rounding boundary; the spread of the ratios is the resolution of this protocol for that
    configuration. None for a graph without static scales (dynamic activations)."""
    import onnx_ir as ir

    model = ir.load(path)
    scales = {v.name: (v, v.const_value.numpy()) for name, v in model.graph.initializers.items()
              if name.endswith(".input_scale")}
    if not scales:
        return None
    ir.external_data.load_to_model(model)  # write copies with every tensor inline
    ratios: dict[str, list[float]] = {t: [] for t in texts}
    out = work / "jittered.onnx"
    for j in range(1, realizations + 1):
        factor = np.float32(1.0 + (-1) ** j * ((j + 1) // 2) * 1e-6)
        for name, (value, original) in scales.items():
            value.const_value = ir.tensor((original * factor).astype(np.float32), name=name)
        ir.save(model, out)
        for t, ppl in perplexity(out, texts).items():
            ratios[t].append(ppl / reference[t])
    out.unlink()
    return ratios


class _Reader:
    """ORT CalibrationDataReader over calibration windows (one window per call)."""

    def __init__(self, ids: np.ndarray, input_names: list[str]):
        self.rows, self.names = list(ids), input_names

    def get_next(self):
        if not self.rows:
            return None
        row = self.rows.pop(0)[None]
        feed = {"input_ids": row, "attention_mask": np.ones_like(row)}
        return {k: v for k, v in feed.items() if k in self.names}


def peers(fp32: Path, calib: np.ndarray, work: Path) -> dict[str, dict]:
    """Quantize the FP32 export with ORT's own tools; returns name -> {path | error, seconds, peak}."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from onnxruntime.quantization.shape_inference import quant_pre_process

    from converter.targets.runners import onnxruntime_session

    # ORT's documented first step: shape inference and graph optimization, which folds each weight's
    # Transpose into a constant so the quantizers see (and per-channel quantize) the MatMul weights
    processed = work / "preprocessed" / "model.onnx"
    processed.parent.mkdir()
    quant_pre_process(str(fp32), str(processed), skip_symbolic_shape=True,  # its sympy pass fails on this export
                      save_as_external_data=True, all_tensors_to_one_file=True,
                      external_data_location="model.onnx.data")
    fp32 = processed
    names = [i.name for i in onnxruntime_session(fp32).get_inputs()]
    common = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                  per_channel=True, op_types_to_quantize=["MatMul"], use_external_data_format=True)
    no_output = {"OpTypesToExcludeOutputQuantization": ["MatMul"]}
    configs = {
        "ORT quantize_static MinMax, MatMul outputs float": (CalibrationMethod.MinMax, no_output),
        "ORT quantize_static Percentile 99.999, MatMul outputs float": (
            CalibrationMethod.Percentile, {**no_output, "CalibPercentile": 99.999}),
    }
    out = {}
    for index, (name, (method, extra)) in enumerate(configs.items()):
        path = work / f"peer{index}.onnx"
        start = time.perf_counter()
        quantize_static(str(fp32), str(path), _Reader(calib, names), calibrate_method=method,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, **extra}, **common)
        out[name] = {"path": path, "seconds": time.perf_counter() - start}
        gc.collect()
        print(f"{name}: quantized in {out[name]['seconds']:.0f} s", file=sys.stderr)
    path = work / "peer_dynamic.onnx"
    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], use_external_data_format=True)
    out["ORT quantize_dynamic (per-tensor dynamic, no smoothing)"] = {"path": path, "seconds": None}
    try:  # ORT's SmoothQuant option delegates to neural-compressor
        import neural_compressor.adaptor  # noqa: F401
        out["ORT quantize_static + SmoothQuant"] = {"error": "neural-compressor imports, but this row is not wired"}
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        out["ORT quantize_static + SmoothQuant"] = {"error": f"not available: {type(exc).__name__}: {exc}"[:160]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-windows", type=int, default=8,
                        help="calibration windows for ORT's quantizers (they keep every tensor in memory)")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--keep", action="store_true",
                        help="keep the rows of bench/results/accuracy.json that this run does not re-measure")
    parser.add_argument("--spread", type=int, default=0, metavar="K",
                        help="also measure each static row of ours on K copies whose activation scales differ "
                        "by parts per million (the protocol's resolution)")
    parser.add_argument("--only", nargs="*", help="run only the rows of ours whose name contains one of these "
                        "(none: peers only)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from converter.export.exporter import export_fp32
    from converter.models.load import load
    from converter.recipe import Export, load_recipe

    recipe = load_recipe(RECIPE)
    loaded = load(recipe)
    texts = {name: windows(recipe, file, loaded.tokenizer) for name, file in TEXTS.items()}
    calib = windows(recipe, "data/gpl-3.0.txt", loaded.tokenizer)
    rows: dict[str, dict] = {}
    if args.keep and (RESULTS / "accuracy.json").is_file():
        rows.update(json.loads((RESULTS / "accuracy.json").read_text())["rows"])
    protocol = {"calibration": "gpl-3.0.txt, all 256-token windows (ORT peers: the first "
                               f"{args.peer_windows}, their calibrators keep every tensor in memory)",
                "evaluation": {name: f"{file}, {len(texts[name])} windows of 256 tokens" for name, file in TEXTS.items()}}

    def save(complete: bool) -> str:
        """Write what is measured so far (a long run that is stopped keeps its finished rows)."""
        for row in rows.values():
            if "ppl" in row:
                row["ratio"] = {t: row["ppl"][t] / rows["FP32 ONNX"]["ppl"][t] for t in TEXTS}
        results = {**stamp(), "protocol": protocol, "complete": complete, "rows": rows,
                   "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        table = markdown(results)
        write_results("accuracy", results, table)
        return table

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32 = work / "fp32" / "model.onnx"
        fp32.parent.mkdir()
        export_fp32(loaded.model, fp32, Export())
        del loaded
        gc.collect()
        reference = perplexity(fp32, texts)
        rows["FP32 ONNX"] = {"ppl": reference}
        print(f"FP32: {reference}", file=sys.stderr)
        for index, (name, (recipe_path, overrides)) in enumerate(OURS.items()):
            if args.only is not None and not any(key in name for key in args.only):
                continue
            result, wall = run_convert(recipe_path, work / f"ours{index}", overrides + no_gates(recipe_path) +
                                       ["parity.polygraphy.int8_atol=1000", "parity.generation.enabled=false"],
                                       ["--no-cache"])
            build = result["targets"]["cpu-onnxruntime"]
            manifest = json.loads((Path(result["artifact"]) / "manifest.json").read_text())
            fallback = manifest.get("fallback") or {}
            rows[name] = {"ppl": perplexity(Path(result["artifact"]) / "model.onnx", texts),
                          "int8_linears": build["fused_linears"], "float_mac_share": fallback.get("float_mac_share", 0.0),
                          "float_linears": fallback.get("fallback", []), "convert_s": wall}
            if args.spread:
                rows[name]["rounding_spread"] = rounding_spread(Path(result["artifact"]) / "model.onnx", texts,
                                                                reference, args.spread, work)
            print(f"{name}: {rows[name]['ppl']}", file=sys.stderr)
            save(complete=False)
        if not args.skip_peers:
            for name, peer in peers(fp32, calib[: args.peer_windows], work).items():
                if "error" in peer:
                    rows[name] = {"error": peer["error"]}
                    continue
                rows[name] = {"ppl": perplexity(peer["path"], texts), "quantize_s": peer["seconds"]}
                print(f"{name}: {rows[name]['ppl']}", file=sys.stderr)
                save(complete=False)
    print(save(complete=True))


def markdown(results: dict) -> str:
    texts = list(TEXTS)
    lines = [f"SmolLM2-135M-Instruct ({SMOLLM2_FP32}), {results['machine']}, {results['date']}"
             f"{'' if results['complete'] else ' (partial run: the rows measured so far)'}. "
             f"Calibration: {results['protocol']['calibration']}.", "",
             f"| configuration | ppl {texts[0]} | vs FP32 | ppl {texts[1]} | vs FP32 | MACs in float |",
             "|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | {row['error']} | | | | |")
            continue
        share = row.get("float_mac_share")
        lines.append(f"| {name} | {row['ppl'][texts[0]]:.2f} | {row['ratio'][texts[0]]:.3f} | "
                     f"{row['ppl'][texts[1]]:.2f} | {row['ratio'][texts[1]]:.3f} | "
                     f"{'' if share is None else f'{share:.1%}'} |")
    spreads = {name: row["rounding_spread"] for name, row in results["rows"].items() if row.get("rounding_spread")}
    if spreads:
        lines += ["", "Rounding spread: the same artifact with its activation scales changed by parts per million, "
                  "ratio vs FP32, median [min, max]:", "",
                  "| configuration | realizations | " + " | ".join(texts) + " |", "|---|---|" + "---|" * len(texts)]
        for name, spread in spreads.items():
            cells = [f"{statistics.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]" for v in spread.values()]
            lines.append(f"| {name} | {len(spread[texts[0]])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
