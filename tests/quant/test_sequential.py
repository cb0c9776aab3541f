"""Block-sequential calibration (converter/quant/sequential.py) over lazily read weights
(converter/models/lazy.py): the statistics of the whole model, one block in memory."""

import json

import pytest
import torch

from converter.errors import UserError
from converter.models.archs import arch_spec, block_linear_names
from converter.models.lazy import INDEX, LazyCheckpoint, StreamedModel
from converter.models.text import Windows
from converter.quant.calibrate import collect_input_amax
from converter.quant.sequential import collect_input_amax_streamed, greedy_continuations, greedy_many, streamed_logits
from tiny_models import DECODERS, sharded_bf16


def windows(n=5, t=24, seed=3):
    return Windows(torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed)), "t", n)


@pytest.mark.parametrize("arch", [a for a in DECODERS if a not in ("gemma2", "gemma3")])
def test_streamed_statistics_equal_the_whole_models(arch, tmp_path):
    _, whole = sharded_bf16(arch, tmp_path)
    assert (tmp_path / INDEX).is_file() and len(set(LazyCheckpoint(tmp_path).weight_map.values())) > 1
    spec = arch_spec(whole)
    names = block_linear_names(whole, spec)
    expected = collect_input_amax(whole, names, windows(), batch_size=2)
    streamed = StreamedModel(tmp_path, spec)
    got = collect_input_amax_streamed(streamed, names, windows(), batch_size=2)
    assert sorted(got.amax) == sorted(expected.amax) and (got.batches, got.tokens) == (expected.batches, expected.tokens)
    for name in names:
        torch.testing.assert_close(got.amax[name], expected.amax[name], rtol=0, atol=0, msg=name)
    # every block was released: no block weight holds storage after the pass
    assert all(p.is_meta for n, p in streamed.model.named_parameters() if n.startswith(spec.blocks + "."))


def test_a_model_whose_layers_differ_in_kind_is_refused_in_one_line(tmp_path):
    _, whole = sharded_bf16("gemma2", tmp_path)
    with pytest.raises(UserError, match=r"its layers are of 2 kinds \(full_attention, sliding_attention\), each with its "
                                        r"own attention mask; block streaming replays one mask for every block$"):
        StreamedModel(tmp_path, arch_spec(whole))


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2", "phi3", "gpt-neox", "opt"])
def test_streamed_decode_step_calibration_equals_the_whole_models(arch, tmp_path):
    """The greedy continuations are produced block-streamed first and then calibrated as prefill."""
    _, whole = sharded_bf16(arch, tmp_path)
    spec = arch_spec(whole)
    names = block_linear_names(whole, spec)
    decoding = windows().with_decode(3, 4)
    expected = collect_input_amax(whole, names, decoding, batch_size=2)
    prefill_only = collect_input_amax(whole, names, windows(), batch_size=2)
    assert any(not torch.equal(expected.amax[n], prefill_only.amax[n]) for n in names)  # the steps add something
    got = collect_input_amax_streamed(StreamedModel(tmp_path, spec), names, decoding, batch_size=2)
    assert (got.batches, got.tokens) == (expected.batches, expected.tokens)
    for name in names:  # a decode step sums in another order than a prefill
        torch.testing.assert_close(got.amax[name], expected.amax[name], rtol=1e-5, atol=1e-6, msg=name)
    prefixes = decoding.input_ids[:3, :20]
    greedy = whole.generate(prefixes, attention_mask=torch.ones_like(prefixes), max_new_tokens=4, min_new_tokens=4,
                            do_sample=False)[:, 20:]
    assert torch.equal(greedy_continuations(StreamedModel(tmp_path, spec), prefixes, 4, batch_size=2), greedy)


def test_a_missing_shard_or_weight_or_a_wrong_shape_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _, whole = sharded_bf16("llama", tmp_path)
    spec = arch_spec(whole)
    name = "model.layers.1.mlp.up_proj.weight"
    block = tmp_path / LazyCheckpoint(tmp_path).weight_map[name]
    tensors = load_file(block)
    save_file({k: v for k, v in tensors.items() if k != name}, block, metadata={"format": "pt"})
    streamed = StreamedModel(tmp_path, spec)  # the blocks are read later, one at a time
    with pytest.raises(UserError, match=rf"shard {block.name} has no tensor {name}, which {INDEX} places there$"):
        streamed.materialize("model.layers.1")
    stored = (tmp_path / INDEX).read_text()
    index = json.loads(stored)
    del index["weight_map"][name]
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(UserError, match=rf"weights {name} are missing$"):
        StreamedModel(tmp_path, spec).materialize("model.layers.1")
    (tmp_path / INDEX).write_text(stored)
    save_file({**tensors, name: tensors[name][:, :-1].contiguous()}, block, metadata={"format": "pt"})
    with pytest.raises(UserError, match=rf"weight {name} is \(\d+, \d+\), config.json builds \(\d+, \d+\)"):
        StreamedModel(tmp_path, spec).materialize("model.layers.1")
    block.unlink()
    with pytest.raises(UserError, match=rf"model.safetensors.index.json names shards that are missing: {block.name}"):
        StreamedModel(tmp_path, spec)


_PEAK_CHILD = """
import json, sys
from pathlib import Path
import torch
import transformers.models.llama.modeling_llama  # noqa: F401  (imports are not what is measured)
from transformers import AutoModelForCausalLM
from converter.models.archs import arch_spec, block_linear_names
from converter.models.lazy import StreamedModel
from converter.models.text import Windows
from converter.quant.calibrate import collect_input_amax
from converter.quant.sequential import collect_input_amax_streamed, greedy_continuations, greedy_many, streamed_logits
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
base = status("VmRSS")
folder = Path(sys.argv[1])
windows = Windows(torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0)), "t", 4)
if sys.argv[2] == "streamed":
    with torch.device("meta"):
        spec = arch_spec(AutoModelForCausalLM.from_config(__import__("transformers").AutoConfig.from_pretrained(folder)))
    streamed = StreamedModel(folder, spec)
    stats = collect_input_amax_streamed(streamed, block_linear_names(streamed.model, spec), windows, 2)
else:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    spec = arch_spec(model)
    stats = collect_input_amax(model, block_linear_names(model, spec), windows, 2)
print(json.dumps({"peak": status("VmHWM") - base, "lm_head": stats.amax["lm_head"].sum().item()}))
"""


def test_streamed_calibration_holds_one_block_where_the_whole_model_path_holds_all(tmp_path):
    """A wide tiny Llama (200 MB in fp32, 17 MB a block): peak memory over the child's resident size
    after its imports (VmHWM: see tests/models/test_pypi_models.py), in a fresh process per path."""
    import json
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import ROOT

    config = LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=1000, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20MB")
    fp32 = 4 * sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    runs = {}
    for path in ("whole", "streamed"):
        proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(tmp_path), path], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        runs[path] = json.loads(proc.stdout.splitlines()[-1])
    assert runs["streamed"]["lm_head"] == runs["whole"]["lm_head"]  # the same statistics
    assert runs["whole"]["peak"] > fp32  # the whole model is resident in fp32
    assert runs["streamed"]["peak"] < fp32 / 2, (runs, fp32)


@pytest.mark.parametrize("arch", [a for a in DECODERS if a not in ("gemma2", "gemma3")])
def test_streamed_logits_equal_the_whole_models(arch, tmp_path):
    """Everything around the blocks is the model's own forward (GPT-2's position embeddings, OPT's
    projections, Granite's logit scaling): logits to the last bit, padding included."""
    _, whole = sharded_bf16(arch, tmp_path)
    ids = windows(4, 20).input_ids
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row
    batches = [(ids[:3], mask[:3]), (ids[3:], mask[3:])]
    expected = [whole(input_ids=i, attention_mask=m, use_cache=False).logits for i, m in batches]
    streamed = StreamedModel(tmp_path, arch_spec(whole))
    got = streamed_logits(streamed, batches)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert all(p.is_meta for n, p in streamed.model.named_parameters() if n.startswith(streamed.spec.blocks + "."))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "granite"])
def test_streamed_generation_reference_equals_the_whole_models(arch, tmp_path):
    """Parity's FP32 greedy tokens for prompts of several lengths, block-streamed."""
    from converter.parity.generation import greedy_torch_many

    _, whole = sharded_bf16(arch, tmp_path)
    ids = windows(6, 20).input_ids.tolist()
    prompts = [ids[0][:7], ids[1][:12], ids[2][:7], ids[3][:12], ids[4][:7], ids[5][:3]]
    expected = greedy_torch_many(whole, prompts, 5)
    got = greedy_many(StreamedModel(tmp_path, arch_spec(whole)), prompts, 5, batch_size=2)
    assert got == expected
