"""What the INT8 artifact's matmuls would compute on an x86 CPU without VNNI, by default.

    .venv/bin/python bench/saturation.py [--artifact DIR] [--tokens 128]

ONNX Runtime runs int8 activations as uint8 (x + 128) times int8 weights. With VNNI
(vpdpbusd) the byte products are summed exactly in int32. Without it (SSE4.1, AVX2, AVX-512
without VNNI) the kernel uses vpmaddubsw, which adds each pair of adjacent products (k, k+1) in
int16 with saturation at +-32767 before the exact int32 sums, unless the session sets
`session.x64quantprecision` (then ORT uses exact uint8 x uint8 kernels on those CPUs). This
benchmark emulates those pair sums for every quantized MatMul of the artifact, with the artifact's
own int8 weights and the int8 activations ONNX Runtime computes for the first `--tokens` tokens
of the evaluation text (read as extra graph outputs of its QuantizeLinear nodes), and reports per
MatMul how many outputs a saturated pair would change and by how much, against the exact integer
sum. Without --artifact the shipped recipe is converted first.
Writes bench/results/saturation.json and bench/results/saturation.md, which the README quotes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from cli_run import SMOLLM2_FP32, shipped_artifact, stamp, write_results

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-cpu.yaml"
INT16_MAX, INT16_MIN = 32767, -32768


def saturation_error(x_u8: np.ndarray, w: np.ndarray, chunk: int = 128) -> np.ndarray:
    """sum_j (sat16(p_2j + p_2j+1) - (p_2j + p_2j+1)) for x_u8 (T, K) uint8 and w (K, N) int8: what
    the pairwise-saturating kernel adds to the exact integer sum x_u8 @ w, per output (T, N)."""
    t, k = x_u8.shape
    if k % 2:
        x_u8, w = np.pad(x_u8, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    a = x_u8.astype(np.int32).reshape(t, -1, 2)
    out = np.zeros((t, w.shape[1]), np.int64)
    for start in range(0, w.shape[1], chunk):
        b = w[:, start:start + chunk].astype(np.int32).reshape(-1, 2, w[:, start:start + chunk].shape[1])
        pairs = np.einsum("tjp,jpn->tjn", a, b)  # (T, K/2, n): each adjacent pair's int16 sum, unsaturated
        out[:, start:start + chunk] = (np.clip(pairs, INT16_MIN, INT16_MAX) - pairs).sum(1)
    return out


def quantized_matmuls(model, weight_suffix: str) -> list[tuple[str, str, str]]:
    """(linear name, activation QuantizeLinear output, int8 weight initializer) of every QDQ MatMul."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        dq_x, dq_w = (producer.get(i) for i in node.input)
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        q_x = producer.get(dq_x.input[0])
        if q_x is not None and q_x.op_type == "QuantizeLinear" and dq_w.input[0] in inits:
            found.append((dq_w.input[0].removesuffix(weight_suffix), dq_x.input[0], dq_w.input[0]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="an artifact folder (default: convert the shipped recipe)")
    parser.add_argument("--tokens", type=int, default=128, help="prompt tokens of the evaluation text")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import onnx
    from onnx import numpy_helper
    from transformers import AutoTokenizer

    from converter.export.kv_graph import graph_kv_layout, prefill_feed
    from converter.export.qdq_names import WEIGHT_SUFFIX
    from converter.models.text import added_special_tokens, token_windows
    from converter.recipe import load_recipe
    from converter.targets.runners import onnxruntime_session

    recipe = load_recipe(RECIPE)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = shipped_artifact(args.artifact, RECIPE, Path(tmp))
        path = artifact / "model.onnx"
        model = onnx.load(str(path))
        matmuls = quantized_matmuls(model, WEIGHT_SUFFIX)
        weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
                   if i.name in {w for _, _, w in matmuls}}
        known = {o.name for o in model.graph.output}
        for _, x_q, _ in matmuls:
            if x_q not in known:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(x_q))
                known.add(x_q)
        probe = Path(tmp) / "probe.onnx"
        onnx.save(model, str(probe), save_as_external_data=True, location="probe.onnx.data")
        del model
        tokenizer = AutoTokenizer.from_pretrained(str(artifact))
        windows = token_windows(recipe, recipe.recipe.parity.sets[0].text(), tokenizer, shuffle=False)
        ids = (added_special_tokens(tokenizer)[0] + [int(t) for t in windows.input_ids.reshape(-1)])[: args.tokens]
        session = onnxruntime_session(probe)
        feed = prefill_feed(np.array([ids], np.int64), np.ones((1, len(ids)), np.int64), graph_kv_layout(probe))
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, session.run(None, feed)))
    rows = []
    for name, x_q, w_name in matmuls:
        x = outputs[x_q].reshape(-1, outputs[x_q].shape[-1])
        w = weights[w_name]
        exact = x.astype(np.int64) @ w.astype(np.int64)
        err = saturation_error((x.astype(np.int16) + 128).astype(np.uint8), w)
        # the u8 offset's correction (128 * column sums of w) is exact: err is the whole output error
        changed = err != 0
        rows.append({"matmul": name, "k": int(w.shape[0]), "n": int(w.shape[1]),
                     "outputs_changed": float(changed.mean()),
                     "rel_error": float(np.sqrt((err.astype(np.float64) ** 2).sum() / max((exact ** 2).sum(), 1))),
                     "max_error_vs_max_output": float(np.abs(err).max() / max(np.abs(exact).max(), 1))})
    affected = [r for r in rows if r["outputs_changed"] > 0]
    results = {**stamp(), "artifact": str(args.artifact or "converted: " + RECIPE.name), "tokens": len(ids),
               "matmuls": len(rows), "matmuls_affected": len(affected),
               "outputs_changed": float(np.mean([r["outputs_changed"] for r in rows])), "rows": rows}
    worst = sorted(rows, key=lambda r: r["rel_error"], reverse=True)[:8]
    lines = [f"SmolLM2-135M-Instruct INT8 artifact ({SMOLLM2_FP32}), "
             "int16 pair saturation emulated (non-VNNI x86 default), "
             f"{len(ids)} tokens, {results['date']}",
             "", f"{len(affected)} of {len(rows)} quantized MatMuls have outputs a saturated pair changes "
             f"(mean share of outputs over all: {100 * results['outputs_changed']:.2f}%). The 8 largest errors:",
             "", "| MatMul (linears) | K x N | outputs changed | error / output (RMS) | max error / max output |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['matmul']} | {r['k']} x {r['n']} | {100 * r['outputs_changed']:.2f}% | {r['rel_error']:.2e} | "
              f"{r['max_error_vs_max_output']:.2e} |" for r in worst]
    table = "\n".join(lines)
    print(table)
    write_results("saturation", results, table)


if __name__ == "__main__":
    main()
