import pytest
import torch

from converter.errors import UserError
from converter.models.archs import arch_spec, block_linear_names
from converter.models.text import Windows
from converter.quant.calibrate import collect_input_amax
from tiny_models import build_tiny


def windows(n=6, t=40, seed=4):
    return Windows(torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed)), "t", n)


def test_running_max_equals_max_over_all_inputs_and_head_input_is_final_norm_output():
    model = build_tiny("qwen3")
    names = block_linear_names(model, arch_spec(model))  # lm_head included
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    stats = collect_input_amax(model, names, windows(), batch_size=4)
    handle.remove()
    expected = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).abs().amax(dim=0)
    torch.testing.assert_close(stats.amax["model.layers.1.mlp.down_proj"], expected)
    assert stats.batches == 2 and stats.tokens == 6 * 40
    with torch.no_grad():
        hidden = model.model(input_ids=windows().input_ids).last_hidden_state
    torch.testing.assert_close(stats.amax["lm_head"], hidden.abs().reshape(-1, 64).amax(dim=0))


def test_non_finite_activation_is_a_clear_error():
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[5] = float("nan")
    with pytest.raises(UserError, match=r"layer model.layers.0.mlp.gate_proj: activation amax is not finite after 1"):
        collect_input_amax(model, ["model.layers.0.mlp.gate_proj"], windows(n=2), batch_size=2)
