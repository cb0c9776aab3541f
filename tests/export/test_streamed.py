"""Export of a block-streamed model (converter/export/streamed.py), smoothed and planned block by block
(converter/quant/sequential.py): the whole model's artifact, byte for byte, with one block in memory."""

import hashlib

import onnx
import pytest
import torch
from onnx import numpy_helper

from converter.export.exporter import export_fp32, insert_qdq
from converter.export.streamed import export_streamed
from converter.models.archs import arch_spec, block_linear_names
from converter.models.lazy import StreamedModel
from converter.models.text import Windows
from converter.quant.calibrate import collect_input_amax
from converter.quant.quantize import plan_quantization
from converter.quant.sequential import collect_input_amax_streamed, plan_streamed, smooth_streamed
from converter.quant.smooth import smooth
from converter.recipe import Export, Quantization, Smoothing
from tiny_models import sharded_bf16

CASES = {  # arch -> (export, quantization): fused GQA attention, fused qkv/gate_up producers, biases, a tied int8 table
    "llama": (Export(kv_cache=True, attention="onnxruntime"), Quantization()),
    "qwen2": (Export(kv_cache=True, attention="onnxruntime"), Quantization()),
    "llama-tied": (Export(kv_cache=True), Quantization(embedding="int8")),
    "phi3": (Export(kv_cache=True), Quantization()),
    "gpt-neox": (Export(), Quantization()),
    "opt": (Export(kv_cache=True), Quantization(exclude=["*.fc2"])),
}


def windows():
    return Windows(torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(3)), "t", 5)


def digest(path):
    data = path.with_name(path.name + ".data")
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in (path, data) if p.is_file()]


@pytest.mark.parametrize("arch", list(CASES))
def test_the_streamed_artifact_is_the_whole_models_byte_for_byte(arch, tmp_path, monkeypatch):
    export, quant = CASES[arch]
    smoothing = Smoothing(alpha=0.6, group_alpha={"mlp_down": 0.8})
    _, whole = sharded_bf16(arch, tmp_path / "checkpoint")
    spec = arch_spec(whole)
    names = block_linear_names(whole, spec)

    stats = collect_input_amax(whole, names, windows(), batch_size=2)
    report = smooth(whole, stats.amax, smoothing, spec)
    ranges = collect_input_amax(whole, names, windows(), batch_size=2).absmax_ranges()
    plan = plan_quantization(whole, names, ranges, quant)
    (tmp_path / "whole").mkdir()
    raw = export_fp32(whole, tmp_path / "whole" / "raw.onnx", export)
    expected = insert_qdq(raw, tmp_path / "whole" / "model.onnx", whole, plan, export).path

    streamed = StreamedModel(tmp_path / "checkpoint", spec)
    got_stats = collect_input_amax_streamed(streamed, names, windows(), batch_size=2)
    got_report = smooth_streamed(streamed, got_stats.amax, smoothing)
    assert got_report.to_dict() == report.to_dict() and report.groups
    got_ranges = collect_input_amax_streamed(streamed, names, windows(), batch_size=2).absmax_ranges()
    assert got_ranges == ranges  # the re-calibration read every block smoothed
    got_plan = plan_streamed(streamed, names, got_ranges, quant)
    assert list(got_plan.linears) == list(plan.linears) and got_plan.excluded == plan.excluded
    reads = []
    materialize = streamed.materialize
    monkeypatch.setattr(streamed, "materialize", lambda prefix: reads.append(prefix) or materialize(prefix))
    (tmp_path / "streamed").mkdir()
    got_raw = export_streamed(streamed, tmp_path / "streamed" / "raw.onnx", export)
    assert reads == [streamed.block_prefix(i) for i in range(len(streamed.blocks))]  # each block read once
    assert all(p.is_meta for n, p in streamed.model.named_parameters() if n.startswith(spec.blocks + "."))

    # the float graphs hold the same initializers, value for value
    want = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(raw)).graph.initializer}
    have = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(got_raw)).graph.initializer}
    assert sorted(have) == sorted(want)
    for name, value in want.items():
        assert have[name].dtype == value.dtype and (have[name] == value).all(), name
    got = insert_qdq(got_raw, tmp_path / "streamed" / "model.onnx", streamed.model, got_plan, export).path
    assert digest(got) == digest(expected)


def test_a_broken_block_preparation_changes_the_bytes(tmp_path):
    """The comparison above can fail: the streamed export of a block smoothed with another alpha differs."""
    export, quant = CASES["llama"]
    _, whole = sharded_bf16("llama", tmp_path / "checkpoint")
    spec = arch_spec(whole)
    names = block_linear_names(whole, spec)
    stats = collect_input_amax(whole, names, windows(), batch_size=2)
    files = []
    for alpha in (0.5, 0.55):
        streamed = StreamedModel(tmp_path / "checkpoint", spec)
        smooth_streamed(streamed, stats.amax, Smoothing(alpha=alpha))
        (tmp_path / str(alpha)).mkdir()
        raw = export_streamed(streamed, tmp_path / str(alpha) / "raw.onnx", export)
        plan = plan_streamed(streamed, names, {n: 1.0 for n in names}, quant)
        files.append(digest(insert_qdq(raw, tmp_path / str(alpha) / "model.onnx", streamed.model, plan, export).path))
    assert files[0] != files[1]


_PEAK_CHILD = """
import json, sys, tempfile
from pathlib import Path
import torch
import transformers.models.llama.modeling_llama  # noqa: F401  (imports are not what is measured)
from transformers import AutoModelForCausalLM
from converter.export.exporter import export_fp32, insert_qdq
from converter.export.streamed import export_streamed
from converter.models.archs import block_linear_names, spec_for
from converter.models.lazy import StreamedModel
from converter.quant.quantize import plan_quantization
from converter.quant.sequential import plan_streamed
from converter.recipe import Export, Quantization
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
base = status("VmRSS")
folder, out = Path(sys.argv[1]), Path(sys.argv[3])
spec = spec_for("LlamaForCausalLM")
export = Export(external_data="always")  # as every model over 2 GB: written tensor by tensor
if sys.argv[2] == "streamed":
    model = StreamedModel(folder, spec)
    names = block_linear_names(model.model, spec)
    plan = plan_streamed(model, names, {n: 1.0 for n in names}, Quantization())
    raw = export_streamed(model, out / "raw.onnx", export)
    skeleton = model.model
else:
    skeleton = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    names = block_linear_names(skeleton, spec)
    plan = plan_quantization(skeleton, names, {n: 1.0 for n in names}, Quantization())
    raw = export_fp32(skeleton, out / "raw.onnx", export)
insert_qdq(raw, out / "model.onnx", skeleton, plan, export)
print(json.dumps({"peak": status("VmHWM") - base}))
"""


def test_the_streamed_export_holds_one_block_where_the_whole_model_path_holds_all(tmp_path):
    """A wide tiny Llama (600 MB in fp32, 38 MB a block) planned, exported and quantized: peak memory
    over the child's resident size after its imports, in a fresh process per path; same artifact.
    Tracing alone takes ~100-150 MB whatever the weights, hence a model this wide."""
    import json
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import ROOT

    config = LlamaConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=1000, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "checkpoint", max_shard_size="40MB")
    fp32 = 4 * sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    runs = {}
    for path in ("whole", "streamed"):
        (tmp_path / path).mkdir()
        proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(tmp_path / "checkpoint"), path,
                               str(tmp_path / path)], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        runs[path] = json.loads(proc.stdout.splitlines()[-1])
    assert digest(tmp_path / "streamed" / "model.onnx") == digest(tmp_path / "whole" / "model.onnx")
    assert runs["whole"]["peak"] > fp32  # the whole model is resident in fp32
    assert runs["streamed"]["peak"] < fp32 / 2, (runs, fp32)
