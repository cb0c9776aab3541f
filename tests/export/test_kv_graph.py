"""KV-cache graphs (export.kv_cache) and greedy generation on tiny models."""

import collections
import copy
import re

import numpy as np
import onnx
import pytest
import torch

from converter.errors import UserError
from converter.export import kv_graph
from converter.export.exporter import export_fp32, insert_qdq
from converter.export.ort_fusion import check_fusable
from converter.models.archs import arch_spec, block_linear_names
from converter.models.text import Windows
from converter.quant.calibrate import collect_input_amax
from converter.parity.generation import (batch_logits, compare_tokens, greedy_graph, greedy_graph_many, greedy_torch,
                                  sequence_logits, session_step,
                                  stepwise_agreement, stepwise_picks)
from converter.quant.quantize import QuantPlan, apply_fake_quant, plan_quantization
from converter.quant.smooth import smooth
from converter.recipe import Export, Quantization, Smoothing
from converter.targets.onnxruntime import build_onnxruntime
from converter.targets.runners import onnxruntime_session
from tiny_models import DECODERS, build_tiny

KV = Export(kv_cache=True)
# cache lengths per block after 40 tokens, of the tiny configs with 16-token sliding windows
SLIDING = {"mistral": [15, 15], "gemma2": [15, 40], "gemma3_text": [15, 40]}


@pytest.fixture(scope="module", params=[*DECODERS, "llama-tied"])
def kv_exported(request, tmp_path_factory):
    """(model, plan, no-cache fp32, kv fp32, kv int8, no-cache int8, folder), smoothed, lm_head int8 too."""
    tmp = tmp_path_factory.mktemp(f"kv-{request.param}")
    model = build_tiny(request.param)
    spec = arch_spec(model)
    names = block_linear_names(model, spec)
    windows = Windows(torch.randint(0, 300, (8, 48), generator=torch.Generator().manual_seed(1)), "t", 8)
    smooth(model, collect_input_amax(model, names, windows, 4).amax, Smoothing(alpha=0.5), spec)
    plan = plan_quantization(model, names, collect_input_amax(model, names, windows, 4).absmax_ranges(),
                             Quantization(exclude=[]))
    plain = export_fp32(model, tmp / "plain.fp32.onnx", Export())
    kv_fp32 = export_fp32(model, tmp / "kv.fp32.onnx", KV)
    kv_int8 = insert_qdq(kv_fp32, tmp / "kv.onnx", model, plan, KV)
    plain_int8 = insert_qdq(plain, tmp / "plain.onnx", model, plan, Export())
    return model, plan, plain, kv_fp32, kv_int8, plain_int8, tmp


def test_kv_graph_io_names_and_dynamic_axes(kv_exported):
    model, *_, kv_int8, _, _ = kv_exported
    graph = onnx.load(str(kv_int8.path)).graph
    layers = model.config.num_hidden_layers
    inputs, outputs = kv_graph.io_names(layers)
    assert [v.name for v in graph.input] == inputs and [v.name for v in graph.output] == outputs
    assert inputs[2:4] == ["past_key_values.0.key", "past_key_values.0.value"]
    dims = [d.dim_value or None for d in graph.input[2].type.tensor_type.shape.dim]
    layout = kv_graph.model_kv_layout(model.config)
    assert dims == [None, layout.kv_heads, None, layout.head_dim]  # batch and past length dynamic
    assert kv_graph.graph_kv_layout(kv_int8.path) == layout


def test_kv_graph_quantizes_the_same_matmuls(kv_exported):
    _, plan, _, _, kv_int8, plain_int8, tmp = kv_exported
    matmuls = kv_int8.quantized_matmuls
    assert matmuls == plain_int8.quantized_matmuls and matmuls <= len(plan.linears)
    ops = collections.Counter(n.op_type for n in onnx.load(str(kv_int8.path)).graph.node)
    assert ops["QuantizeLinear"] == matmuls and ops["DequantizeLinear"] == 2 * matmuls
    report = build_onnxruntime("cpu-onnxruntime", kv_int8.path, tmp, plan)
    assert report.unfused_linears == [] and report.fused_linears == len(plan.linears)


@pytest.mark.parametrize("prefill", [13, 24])
@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_prefill_then_decode_matches_no_cache_logits(kv_exported, which, prefill):
    """40 tokens: past the tiny models' 16-token sliding windows, from a prefill inside and one past it."""
    model, _, plain, kv_fp32, kv_int8, plain_int8, _ = kv_exported
    kv_path, plain_path = (kv_fp32, plain) if which == "fp32" else (kv_int8.path, plain_int8.path)
    kv, full = onnxruntime_session(kv_path), onnxruntime_session(plain_path)
    layout = kv_graph.graph_kv_layout(kv_path)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(5)).numpy()
    ref = full.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]  # (2, 40, V)
    step = session_step(kv)
    out = step(kv_graph.prefill_feed(ids[:, :prefill], np.ones((2, prefill), np.int64), layout))
    got = [out["logits"]]
    for t in range(prefill, 40):  # one-token decode steps feeding the cache back
        past = {p: out[q] for p, q in zip(kv_graph.past_names(layout.num_layers), kv_graph.present_names(layout.num_layers))}
        out = step({"input_ids": ids[:, t : t + 1], "attention_mask": np.ones((2, t + 1), np.int64), **past})
        got.append(out["logits"])
    got = np.concatenate(got, axis=1)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(got[:, prefill:] - ref[:, prefill - 1 : -1]).max() > 1e-2  # a step off by one position would show
    kept = {kind: [out[f"present.{i}.{kind}"].shape[2] for i in range(layout.num_layers)] for kind in ("key", "value")}
    assert kept["key"] == kept["value"] == SLIDING.get(model.config.model_type, [40, 40])  # windows keep the last 15


def test_ort_int8_greedy_tokens_equal_pytorch_fake_quant(kv_exported):
    model, plan, _, _, kv_int8, _, _ = kv_exported
    fq = apply_fake_quant(copy.deepcopy(model), plan)
    step = session_step(onnxruntime_session(kv_int8.path))
    layout = kv_graph.graph_kv_layout(kv_int8.path)
    prompts = [[int(t) for t in torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (3, 11, 24)]
    ort_tokens = [list(greedy_graph(step, layout, p, 20)) for p in prompts]
    fq_tokens = [greedy_torch(fq, p, 20) for p in prompts]
    assert ort_tokens == fq_tokens
    assert all(len(t) == 20 for t in ort_tokens)
    assert len({tuple(t) for t in ort_tokens}) == len(prompts)  # the prompts really steer generation


def test_batched_greedy_and_stepwise_equal_one_prompt_at_a_time(kv_exported):
    """Generation parity batches prompts of one length (at most max_batch rows): each row's tokens and
    stepwise picks are the ones it gets alone, including rows of another length in their own batch."""
    _, _, _, _, kv_int8, _, _ = kv_exported
    calls = []
    session_run = session_step(onnxruntime_session(kv_int8.path))

    def step(feed):
        calls.append(feed["input_ids"].shape[0])
        return session_run(feed)

    layout = kv_graph.graph_kv_layout(kv_int8.path)
    gen = torch.Generator().manual_seed(3)
    prompts = [[int(t) for t in torch.randint(0, 300, (n,), generator=gen)] for n in (12, 12, 12, 7, 12)]
    alone = [list(greedy_graph(session_run, layout, p, 10)) for p in prompts]
    assert len({tuple(t) for t in alone}) == len(prompts)  # the rows really differ
    batched = greedy_graph_many(step, layout, prompts, 10, max_batch=3)
    assert batched == alone
    assert sorted(set(calls)) == [1, 3]  # rows of length 12 in batches of 3 and 1; the length-7 prompt alone
    # its own first 5 tokens (picked), then 5 random ones (mostly missed)
    reference = [t[:5] + [int(x) for x in torch.randint(0, 300, (5,), generator=gen)] for t in alone]
    one_by_one = stepwise_agreement(lambda ids: sequence_logits(session_run, layout, ids), prompts, reference)
    assert stepwise_agreement(None, prompts, reference, batched=batch_logits(session_run, layout, 2)) == one_by_one
    assert 0.5 <= one_by_one < 1


def test_greedy_graph_without_cache_equals_with_cache(kv_exported):
    _, _, _, _, kv_int8, plain_int8, _ = kv_exported
    prompt = list(range(40, 57))
    with_cache = list(greedy_graph(session_step(onnxruntime_session(kv_int8.path)),
                                   kv_graph.graph_kv_layout(kv_int8.path), prompt, 12))
    without = list(greedy_graph(session_step(onnxruntime_session(plain_int8.path)), None, prompt, 12))
    assert with_cache == without


def test_compare_tokens_definitions():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    cand = [[1, 2, 9, 4], [5, 6, 7, 8]]
    m = compare_tokens(ref, cand, prompt_tokens=10)
    assert m.first_divergence == [2, 4]
    assert m.token_agreement == pytest.approx((3 / 4 + 1) / 2)  # position 3 lines up again: counted
    assert m.prefix_agreement == pytest.approx((2 / 4 + 1) / 2)  # strict: everything after index 2 wrong


def test_stepwise_agreement_judges_each_step_on_the_references_context():
    def next_is_previous_plus_one(ids):  # a candidate whose logits at position t pick ids[t] + 1
        logits = np.zeros((len(ids), 16), np.float32)
        logits[np.arange(len(ids)), (np.asarray(ids) + 1) % 16] = 1.0
        return logits

    # fed [2, 3, 4] and the reference's 5, 6, 9 it picks 5, 6, 7, 10: step 2 misses (7, not 9), step 3
    # is judged after the reference's 9 and matches; left to itself it would generate 5, 6, 7, 8
    rate = stepwise_agreement(next_is_previous_plus_one, [[2, 3, 4], [0]], [[5, 6, 9, 10], [1, 2, 3, 4]])
    assert rate == pytest.approx((3 / 4 + 1) / 2)
    free_running = compare_tokens([[5, 6, 9, 10]], [[5, 6, 7, 8]], prompt_tokens=3)
    assert free_running.token_agreement == 0.5


def _kv_loop_picks(step, layout, prompt: list[int], tokens: list[int]) -> list[int]:
    """Stepwise picks the slow way: prefill the prompt, then feed the reference's tokens one decode
    step at a time through the returned cache, taking the argmax before each."""
    out = step(kv_graph.prefill_feed(np.array([prompt]), np.ones((1, len(prompt)), np.int64), layout))
    picks, seen = [], list(prompt)
    for token in tokens:
        picks.append(int(np.asarray(out["logits"])[0, -1].argmax()))
        seen.append(token)
        past = {p: out[q] for p, q in zip(kv_graph.past_names(layout.num_layers), kv_graph.present_names(layout.num_layers))}
        out = step({"input_ids": np.array([[token]]), "attention_mask": np.ones((1, len(seen)), np.int64), **past})
    return picks


def test_one_prefill_stepwise_picks_equal_the_kv_cache_loop(kv_exported):
    model, _, _, _, kv_int8, _, _ = kv_exported
    step = session_step(onnxruntime_session(kv_int8.path))
    layout = kv_graph.graph_kv_layout(kv_int8.path)
    gen = torch.Generator().manual_seed(7)
    prompt, reference = ([int(t) for t in torch.randint(0, 300, (n,), generator=gen)] for n in (9, 12))
    one_prefill = stepwise_picks(lambda ids: sequence_logits(step, layout, ids), prompt, reference)
    loop = _kv_loop_picks(step, layout, prompt, reference)
    assert one_prefill.tolist() == loop
    # the test can tell a shift: the pass's logits one position later (or earlier) pick other tokens
    logits = sequence_logits(step, layout, prompt + reference[:-1])
    assert logits[len(prompt):].argmax(-1).tolist() != loop[:-1]
    assert logits[len(prompt) - 2 : -1].argmax(-1).tolist() != loop
    rate = stepwise_agreement(lambda ids: sequence_logits(step, layout, ids), [prompt], [reference])
    assert rate == pytest.approx(np.mean(np.asarray(loop) == np.asarray(reference)))


def test_tensorrt_profile_covers_past_and_mask_lengths(kv_exported):
    from converter.targets.engine_options import EngineOptions
    from converter.targets.tensorrt import profile_shapes

    *_, kv_int8, _, _ = kv_exported
    options = EngineOptions(batch={"min": 1, "opt": 2, "max": 4}, sequence={"min": 1, "opt": 1, "max": 64},
                            past_sequence={"min": 0, "opt": 32, "max": 448})
    shapes = profile_shapes(kv_int8.path, options)
    layout = kv_graph.graph_kv_layout(kv_int8.path)
    assert shapes["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [4, 64]}
    assert shapes["attention_mask"] == {"min": [1, 1], "opt": [2, 33], "max": [4, 512]}  # past + current
    h, d = layout.kv_heads, layout.head_dim
    assert shapes["past_key_values.1.value"] == {"min": [1, h, 0, d], "opt": [2, h, 32, d], "max": [4, h, 448, d]}


@pytest.mark.skipif(not __import__("converter.targets.tensorrt_rtx", fromlist=["rtx_available"]).rtx_available(),
                    reason="TensorRT-RTX packages not installed")
@pytest.mark.parametrize("past_opt", [0, 16])
def test_tensorrt_parser_and_builder_accept_the_kv_graph(kv_exported, past_opt):
    """Zero-length past (prefill) and a decode step both parse and build; every linear stays int8."""
    from converter.targets.engine_options import EngineOptions
    from converter.targets.tensorrt_rtx import accept

    _, plan, _, _, kv_int8, _, _ = kv_exported
    options = EngineOptions(sequence={"min": 1, "opt": 1 if past_opt else 16, "max": 64},
                            past_sequence={"min": 0, "opt": past_opt, "max": 64})
    result = accept(kv_int8.path, options)
    assert result["parsed"] and result["built"], result.get("error")
    assert sorted(result["network"]["int8_matmul_linears"]) == sorted(plan.linears)
    assert result["network"]["int8_matmul_layers"] == kv_int8.quantized_matmuls
    assert result["profiles"][0]["past_key_values.0.key"]["opt"][2] == past_opt


# families whose exported attention `export.attention: onnxruntime` rewrites; the others keep the
# standard graph (BLOOM's ALiBi, GPT-NeoX's rotary over 4 of 16 dimensions) and must get a one-line
# error instead
ORT_ATTENTION = ("llama", "qwen2", "qwen3", "mistral", "smollm3", "granite", "starcoder2", "gemma", "gemma2", "gemma3",
                 "phi3", "phi", "opt", "gpt2", "llama-tied")
GQA = Export(kv_cache=True, attention="onnxruntime")


def _decode_logits(path, ids, mask, prefill: int) -> np.ndarray:
    """Logits of a prefill of `prefill` tokens, then one-token steps over the rest of `ids`."""
    step, layout = session_step(onnxruntime_session(path)), kv_graph.graph_kv_layout(path)
    out = step(kv_graph.prefill_feed(ids[:, :prefill], mask[:, :prefill], layout))
    got = [out["logits"]]
    for t in range(prefill, ids.shape[1]):
        past = {p: out[q] for p, q in zip(kv_graph.past_names(layout.num_layers), kv_graph.present_names(layout.num_layers))}
        out = step({"input_ids": ids[:, t : t + 1], "attention_mask": mask[:, : t + 1], **past})
        got.append(out["logits"])
    return np.concatenate(got, axis=1)


@pytest.fixture(scope="module")
def ort_attention(kv_exported):
    """(fused fp32, fused int8) graphs of the family, or the UserError the rewrite raised."""
    model, plan, _, kv_fp32, _, _, tmp = kv_exported
    try:
        fp32 = insert_qdq(kv_fp32, tmp / "gqa.fp32.onnx", model, QuantPlan(linears={}, excluded=[]), GQA)
        return fp32.path, insert_qdq(kv_fp32, tmp / "gqa.onnx", model, plan, GQA)
    except UserError as err:
        return err


def test_ort_attention_fuses_every_layer_or_names_the_layer(kv_exported, ort_attention, request):
    model, plan, _, _, kv_int8, _, tmp = kv_exported
    family = request.node.callspec.params["kv_exported"]
    if isinstance(ort_attention, UserError):
        assert family not in ORT_ATTENTION, ort_attention
        assert re.fullmatch(r"export\.attention onnxruntime: layer \d+ of \w+ is not attention this rewrite knows "
                            r"\(.+\); use export\.attention: onnx", str(ort_attention))
        return
    assert family in ORT_ATTENTION
    _, int8 = ort_attention
    graph = onnx.load(str(int8.path)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops["GroupQueryAttention"] == model.config.num_hidden_layers and not ops["Softmax"]
    assert [v.name for v in graph.input] == [v.name for v in onnx.load(str(kv_int8.path)).graph.input]
    assert [v.name for v in graph.output] == kv_graph.io_names(model.config.num_hidden_layers)[1]
    assert int8.quantized_matmuls == kv_int8.quantized_matmuls
    report = build_onnxruntime("cpu-onnxruntime", int8.path, tmp, plan)
    assert report.unfused_linears == [] and report.fused_linears == len(plan.linears)


def test_ort_attention_preflight_refuses_only_what_the_rewrite_refuses(kv_exported, ort_attention, request):
    """`check_fusable` runs at load, before calibration: it may refuse a family early only if the
    graph rewrite would refuse it too (a rotary width the kernel refuses)."""
    family = request.node.callspec.params["kv_exported"]
    try:
        check_fusable(kv_exported[0])
    except UserError as err:
        assert isinstance(ort_attention, UserError), f"the rewrite fuses {family}, the pre-flight refused it: {err}"
        assert family == "gpt-neox", err
        assert re.fullmatch(r"export\.attention onnxruntime: .+; use export\.attention: onnx", str(err))
        return
    assert family != "gpt-neox"


def test_ort_attention_logits_match_the_standard_graph(kv_exported, ort_attention):
    """FP32, so the comparison is of attention alone: prefill, decode steps past the tiny models'
    16-token sliding windows, and a left-padded row."""
    if isinstance(ort_attention, UserError):
        pytest.skip("the rewrite does not apply to this family (checked above)")
    _, _, _, kv_fp32, _, _, _ = kv_exported
    fused, _ = ort_attention
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(5)).numpy()
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded: its first 4 tokens are masked everywhere
    ref, got = _decode_logits(kv_fp32, ids, mask, 13), _decode_logits(fused, ids, mask, 13)
    scale = np.abs(ref).max()
    assert np.abs(got[0] - ref[0]).max() < 1e-5 * scale + 1e-5
    assert np.abs(got[1, 4:] - ref[1, 4:]).max() < 1e-5 * scale + 1e-5
    # the padding mattered: the padded row differs from the same tokens unpadded
    unpadded = _decode_logits(fused, ids, np.ones_like(ids), 13)
    assert np.abs(unpadded[1, 4:] - got[1, 4:]).max() > 1e-3


def test_ort_attention_int8_greedy_tokens_equal_pytorch_fake_quant(kv_exported, ort_attention):
    if isinstance(ort_attention, UserError):
        pytest.skip("the rewrite does not apply to this family (checked above)")
    model, plan, *_ = kv_exported
    _, int8 = ort_attention
    fq = apply_fake_quant(copy.deepcopy(model), plan)
    step, layout = session_step(onnxruntime_session(int8.path)), kv_graph.graph_kv_layout(int8.path)
    prompts = [[int(t) for t in torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (3, 11, 24)]
    assert [list(greedy_graph(step, layout, p, 20)) for p in prompts] == [greedy_torch(fq, p, 20) for p in prompts]
