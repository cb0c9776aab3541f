import collections
import copy
import platform

import numpy as np
import onnx
from onnx import TensorProto
import pytest
import torch
import torch.nn.functional as F

from converter.models.archs import arch_spec, block_linear_names
from converter.models.text import Windows
from converter.quant.calibrate import collect_input_amax
from converter.quant.quantize import (
    FakeQuantLinear,
    LinearQuant,
    activation_scale,
    apply_fake_quant,
    fake_quantize_weight,
    fake_quantize_activation,
    fake_quantize_input,
    plan_quantization,
    quantize_weight,
    split_by_exclusions,
    weight_scales,
)
from converter.quant.smooth import smooth
from converter.recipe import Quantization, Smoothing
from converter.targets.runners import onnxruntime_session
from conftest import qdq_matmul_model
from tiny_models import build_tiny


def windows(n=8, t=48, seed=1):
    return Windows(torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed)), "t", n)


def w8a8(model, smoothing: Smoothing):
    """Smooth (optionally), calibrate static scales, return the fake-quant model."""
    spec = arch_spec(model)
    names = block_linear_names(model, spec)
    quantized, _ = split_by_exclusions(names, ["lm_head"])
    stats = collect_input_amax(model, quantized, windows(), 4)
    if smooth(model, stats.amax, smoothing, spec).groups:
        stats = collect_input_amax(model, quantized, windows(), 4)
    plan = plan_quantization(model, names, stats.absmax_ranges(), Quantization())
    return apply_fake_quant(copy.deepcopy(model), plan), plan


def test_weight_quantization_formula_inline():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.74]])
    scales = weight_scales(w)
    torch.testing.assert_close(scales, torch.tensor([1.0 / 127, 1.0, 3.0 / 127]))
    q = quantize_weight(w, scales)
    assert q.dtype == torch.int8
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, -31]]  # round half to even: 63.5 -> 64


def test_wider_weight_grids_round_the_same_way_on_more_steps():
    w = torch.tensor([[0.5, -1.0, 0.25], [3.0, 1.5, -0.74]])
    int8 = fake_quantize_weight(w, weight_scales(w))
    torch.testing.assert_close(int8, quantize_weight(w, weight_scales(w)).float() * weight_scales(w).view(-1, 1))
    ten = fake_quantize_weight(w, weight_scales(w, 511), 511)  # 10 bits: 3.0 / 511 a step in row 2
    torch.testing.assert_close(ten[1], torch.tensor([511.0, 256.0, -126.0]) * (3.0 / 511))  # 255.5 -> 256
    assert (ten - w).abs().max() < (int8 - w).abs().max() / 3


def test_activation_fake_quant_saturates_and_rounds_half_even():
    scale = activation_scale(12.7)  # 0.1
    x = torch.tensor([0.05, 0.15, -0.25, 100.0, -100.0])
    out = fake_quantize_activation(x, scale)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.2, -0.2, 12.7, -12.8]))


def test_an_unknown_activation_mode_is_refused_not_run_as_another():
    x, scale = torch.tensor([0.05, 3.0]), activation_scale(12.7)
    torch.testing.assert_close(fake_quantize_input(x, "static", scale), fake_quantize_activation(x, scale))
    with pytest.raises(ValueError, match="'per_token'"):
        fake_quantize_input(x, "per_token", scale)
    with pytest.raises(ValueError, match="not one of"):
        LinearQuant(name="fc", in_features=2, out_features=2, act_amax=1.0, act_scale=scale,
                    weight_scale=torch.ones(2), weight_rel_error=0.0, act_mode="per_token")


@pytest.mark.skipif(platform.machine().lower() not in {"x86_64", "amd64"}, reason="x86 CPU flags")
def test_only_an_x86_cpu_with_vnni_or_amx_counts_as_exact(tmp_path):
    from converter.targets.runners import int8_products_exact

    def cpu(flags: str):
        path = tmp_path / f"cpuinfo-{len(list(tmp_path.iterdir()))}"
        path.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        return str(path)

    assert not int8_products_exact(cpu("fpu sse4_1 avx2 fma"))  # Haswell .. Skylake, Zen 1-3
    assert not int8_products_exact(cpu("avx2 avx512f avx512bw avx512_vnnix"))  # AVX-512 without VNNI
    assert int8_products_exact(cpu("avx2 avx512f avx512_vnni"))  # Cascade Lake+, Zen 4+
    assert int8_products_exact(cpu("avx2 avx_vnni"))  # Alder Lake+
    assert int8_products_exact(cpu("avx2 amx_int8 amx_tile"))
    assert not int8_products_exact(str(tmp_path / "missing"))  # unknown: the exact kernels, to be safe


@pytest.mark.parametrize("exact_kernels", [False, True], ids=["default-kernels", "x64quantprecision"])
@pytest.mark.parametrize("k,n,bias", [(576, 960, False), (64, 256, True), (1536, 576, False)])
def test_fake_quant_linear_equals_onnx_runtimes_int8_kernel_bit_for_bit(k, n, bias, exact_kernels, tmp_path,
                                                                       monkeypatch):
    """Also with the uint8 x uint8 kernels a session asks for on a CPU without VNNI (x86 builds of
    ONNX Runtime switch to them on any AVX2 CPU when asked, so this machine runs them too)."""
    from converter.targets import runners

    if not exact_kernels and not runners.int8_products_exact():
        pytest.skip("this CPU's default int8 kernels saturate (no VNNI): its sessions use the exact ones")
    monkeypatch.setattr(runners, "int8_products_exact", lambda: not exact_kernels)
    torch.manual_seed(k)
    linear = torch.nn.Linear(k, n, bias=bias)
    x = torch.randn(2, 19, k) * 3
    amax = float(x.abs().max()) * 0.8  # some inputs saturate
    quant = LinearQuant(name="fc", in_features=k, out_features=n, act_amax=amax, act_scale=activation_scale(amax),
                        weight_scale=weight_scales(linear.weight), weight_rel_error=0.0, act_mode="static")
    model = qdq_matmul_model(quantize_weight(linear.weight, quant.weight_scale).T.contiguous().numpy(),
                             quant.weight_scale.numpy(), quant.act_scale.numpy(),
                             bias=None if linear.bias is None else linear.bias.detach().numpy())
    onnx.save(model, tmp_path / "linear.onnx")
    session = onnxruntime_session(tmp_path / "linear.onnx", optimized_model_path=tmp_path / "optimized.onnx")
    options = session.get_session_options()
    if exact_kernels:
        assert options.get_session_config_entry(runners.EXACT_INT8_OPTION) == "1"
    else:
        with pytest.raises(RuntimeError, match="does not have configuration"):
            options.get_session_config_entry(runners.EXACT_INT8_OPTION)
    optimized = onnx.load(tmp_path / "optimized.onnx")
    ops = collections.Counter(node.op_type for node in optimized.graph.node)
    assert ops["MatMulIntegerToFloat"] == 1 and ops["MatMul"] == 0  # the int8 kernel ran, not the float MatMul
    kernel = next(node for node in optimized.graph.node if node.op_type == "MatMulIntegerToFloat")
    weight_type = next(i.data_type for i in optimized.graph.initializer if i.name == kernel.input[1])
    if platform.machine().lower() in {"x86_64", "amd64"}:  # the exact kernels take the weights as uint8 (w + 128)
        assert weight_type == (TensorProto.UINT8 if exact_kernels else TensorProto.INT8)
    y_ort = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        y_fake = FakeQuantLinear(linear, quant)(x).numpy()
        # dequantized values summed in float: the ONNX definition of the same graph, a few ulps away
        y_float = F.linear(fake_quantize_activation(x, quant.act_scale),
                           fake_quantize_weight(linear.weight, quant.weight_scale), linear.bias).numpy()
    assert np.array_equal(y_fake, y_ort), float(np.abs(y_fake - y_ort).max())
    assert not np.array_equal(y_float, y_ort)  # so the equality above is not a property of any order
    np.testing.assert_allclose(y_float, y_ort, rtol=0, atol=1e-5 * float(np.abs(y_ort).max()))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_smoothquant_error_far_below_naive_on_planted_outliers(arch):
    x = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(7))
    float_model = build_tiny(arch)
    with torch.no_grad():
        ref = float_model(x).logits
    naive, _ = w8a8(build_tiny(arch), Smoothing(enabled=False))
    smoothed, _ = w8a8(build_tiny(arch), Smoothing(alpha=0.5))
    with torch.no_grad():
        err_naive = (naive(x).logits - ref).pow(2).mean().sqrt()
        err_smooth = (smoothed(x).logits - ref).pow(2).mean().sqrt()
    assert err_smooth < 0.25 * err_naive, (float(err_smooth), float(err_naive))


def test_plan_covers_block_linears_and_excludes_lm_head():
    model = build_tiny("llama")
    _, plan = w8a8(model, Smoothing(alpha=0.5))
    assert plan.excluded == ["lm_head"]
    assert len(plan.linears) == 2 * 7
    q = plan.linears["model.layers.0.mlp.down_proj"]
    assert q.weight_scale.shape == (64,) and q.act_scale.dtype == torch.float32
    assert float(q.act_scale) == pytest.approx(q.act_amax / 127, rel=1e-6)
    assert 0 < q.weight_rel_error < 0.02


def test_exclusion_patterns():
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj", "lm_head"]
    quantized, excluded = split_by_exclusions(names, ["*.down_proj", "lm_head"])
    assert quantized == ["model.layers.1.mlp.up_proj"]
    assert excluded == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]


def test_fake_quant_swaps_exactly_the_planned_linears():
    model = build_tiny("qwen2")
    fq, plan = w8a8(model, Smoothing(alpha=0.5))
    swapped = {n for n, m in fq.named_modules() if isinstance(m, FakeQuantLinear)}
    assert swapped == set(plan.linears)
    assert fq.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2 biases stay float


def test_quantizing_a_weight_rows_at_a_time_gives_the_same_int8():
    weight = torch.randn(37, 11, generator=torch.Generator().manual_seed(0)) * 3
    scales = weight_scales(weight)
    whole = torch.round(weight / scales.view(-1, 1)).clamp(-127, 127).to(torch.int8)
    assert torch.equal(quantize_weight(weight, scales, rows=5), whole)
    assert torch.equal(quantize_weight(weight, scales, rows=4096), whole)
