"""bench/synthetic.py: sharded BF16 checkpoints of Llama-3.2-3B and Llama-3.1-8B shapes (random weights,
for memory and time only), written in the layout real sharded checkpoints have."""

import json
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT
from converter.models.load import load_reference
from converter.recipe import Source

sys.path.insert(0, str(ROOT / "bench"))
import synthetic  # noqa: E402


@pytest.mark.parametrize("shape, params", [("llama-3.2-3b", 3_212_749_824), ("llama-3.1-8b", 8_030_261_248)])
def test_shapes_have_the_public_models_parameter_counts(shape, params):
    shapes = synthetic.tensor_shapes(synthetic.SHAPES[shape])
    assert sum(torch.Size(s).numel() for s in shapes.values()) == params


def test_tiny_checkpoint_is_sharded_and_loads_tensor_for_tensor(tiny_checkpoints, tmp_path):
    out = tmp_path / "synthetic"
    meta = synthetic.write_checkpoint("tiny", out, tiny_checkpoints["llama"], shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 3 and all((out / f).is_file() for f in shards)
    assert set(index["weight_map"]) == set(synthetic.tensor_shapes(synthetic.SHAPES["tiny"]))
    assert "meaningless" in meta["synthetic"]
    model = load_reference(out, Source(path=str(out)))
    state = model.state_dict()
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), framework="pt") as f:
            stored = f.get_tensor(name)
        assert stored.dtype == torch.bfloat16
        assert torch.equal(state[name], stored.float()), name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()
