"""The architecture table end to end: new decoder and encoder families convert, a recipe can supply
the layer map of a class the table lacks, and the encoder parity metric measures what it says."""

import collections
import json

import pytest
import torch
import yaml

from conftest import CALIBRATION_TEXT, tiny_recipe_dict
from converter.models.archs import ARCHITECTURES
from converter.parity.encoder import EncoderAccumulator, mean_pool
from runcli import run_cli


def _convert(recipe_data, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data))
    code, stdout, stderr = run_cli(path, "--output-dir", tmp_path / "out", "--json", "--quiet")
    return code, (json.loads(stdout) if code == 0 else None), stderr


def _manifest(tmp_path):
    return json.loads(next((tmp_path / "out").glob("*/*/manifest.json")).read_text())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_model_has_the_recipes_opset_or_the_run_is_refused(arch, tiny_checkpoints, tmp_path):
    """The exporter writes opset 18 and converts down. GPT-2 converts to 17, but the constant folder
    used to leave it an opset-18 Split (ONNX Runtime refused the graph: exit 3); the KV-cache Llama
    graph does not convert, and was published at opset 18 under a manifest saying 17."""
    import onnx

    data = tiny_recipe_dict(tiny_checkpoints[arch])
    data["export"] = {"kv_cache": True, "opset": 17}
    code, result, stderr = _convert(data, tmp_path)
    if arch == "llama":
        assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
        assert ("export.opset 17: ONNX's version converter could not take this model from opset 18 down to 17; "
                "use export.opset 18 or higher") in stderr
        return
    assert code == 0, stderr
    manifest = _manifest(tmp_path)
    model = onnx.load(str(next((tmp_path / "out").glob("*/*/model.onnx"))))
    assert [o.version for o in model.opset_import if o.domain == ""] == [17] and manifest["model"]["opset"] == 17
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    assert splits and all(len(n.input) == 2 and not any(a.name == "num_outputs" for a in n.attribute) for n in splits)
    assert result["targets"]["cpu-onnxruntime"]["parity"]["passed"]


@pytest.mark.parametrize("arch, architecture, groups, int8", [
    ("opt", "OPTForCausalLM", {"attn_in", "mlp_in", "mlp_down", "attn_out"}, 12),  # Gemm rewritten, all fused
    ("phi3", "Phi3ForCausalLM", {"attn_in", "mlp_in", "mlp_down", "attn_out"}, 8),
    ("gpt2", "GPT2LMHeadModel", {"attn_in", "mlp_in", "attn_out"}, 8),  # Conv1D checkpoint, swapped at load
    ("gpt-neox", "GPTNeoXForCausalLM", {"attn_in", "mlp_in", "attn_out"}, 8),  # parallel residual
    ("phi", "PhiForCausalLM", {"attn_in", "attn_out"}, 12),  # one norm feeds q/k/v and fc1
    ("starcoder2", "Starcoder2ForCausalLM", {"attn_in", "mlp_in", "attn_out"}, 12),
    # 64-token windows, past its 16-token sliding window
    ("gemma2", "Gemma2ForCausalLM", {"attn_in", "mlp_in", "mlp_down", "attn_out"}, 14),
])
def test_new_decoder_converts_end_to_end(arch, architecture, groups, int8, tiny_checkpoints, tmp_path):
    code, result, stderr = _convert(tiny_recipe_dict(tiny_checkpoints[arch]), tmp_path)
    assert code == 0, stderr
    manifest = _manifest(tmp_path)
    assert manifest["source"]["architecture"] == architecture
    assert manifest["model"]["kind"] == "decoder" and manifest["model"]["outputs"] == ["logits"]
    assert {g["group"] for g in manifest["smoothing"]["groups"]} == groups
    target = manifest["targets"]["cpu-onnxruntime"]
    assert target["build"]["fused_linears"] == int8 and target["build"]["unfused_linears"] == []
    metrics = target["parity"]["metrics"]
    assert metrics["ppl_ratio"] is not None and metrics["compared"] == "logits"


def test_encoder_converts_with_pooled_embedding_parity(tiny_checkpoints, tmp_path):
    code, result, stderr = _convert(tiny_recipe_dict(tiny_checkpoints["bert"]), tmp_path)
    assert code == 0, stderr
    manifest = _manifest(tmp_path)
    model = manifest["model"]
    assert model["kind"] == "encoder" and model["outputs"] == ["last_hidden_state"]
    assert model["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [g["group"] for g in manifest["smoothing"]["groups"]] == ["attn_out", "attn_out"]  # post-LN
    target = manifest["targets"]["cpu-onnxruntime"]
    assert target["build"]["fused_linears"] == 12
    metrics = target["parity"]["metrics"]
    assert metrics["compared"] == "mean-pooled embedding"
    assert metrics["ppl_ratio"] is None and metrics["kl_mean"] is None and metrics["top1_agreement"] is None
    assert 0.95 <= metrics["min_cosine"] <= metrics["mean_cosine"] <= 1.0
    # Triton sees the encoder's own inputs and output, read from the graph
    config = next((tmp_path / "out").glob("*/*/triton/*/config.pbtxt")).read_text()
    assert 'name: "token_type_ids"' in config and 'name: "last_hidden_state"' in config
    assert "mean-pooled embedding cosine" in next((tmp_path / "out").glob("*/*/parity_report.md")).read_text()


def test_classifier_reports_logits_agreement(tiny_checkpoints, tmp_path):
    data = tiny_recipe_dict(tiny_checkpoints["bert-cls"])
    data["quantization"] = {"exclude": []}  # the classifier is the head: quantize it too
    code, result, stderr = _convert(data, tmp_path)
    assert code == 0, stderr
    manifest = _manifest(tmp_path)
    assert manifest["model"]["outputs"] == ["logits"]
    assert "bert.classifier" not in manifest["model"]["float_linears"]
    assert manifest["targets"]["cpu-onnxruntime"]["build"]["fused_linears"] == 13  # 12 + classifier
    metrics = manifest["targets"]["cpu-onnxruntime"]["parity"]["metrics"]
    assert metrics["compared"] == "logits" and metrics["top1_agreement"] is not None
    assert metrics["ppl_ratio"] is None


POST_LN = {"attn_out": 2}  # value -> output dense only, in each of 2 blocks


@pytest.mark.parametrize("arch, architecture, inputs, compared, groups, int8", [
    # + classifier.out_proj; one segment type: no token_type_ids input, unlike BERT
    ("roberta-cls", "RobertaForSequenceClassification", 2, "logits", POST_LN, 13),
    ("distilbert", "DistilBertModel", 2, "mean-pooled embedding", POST_LN, 12),
    ("bert-ner", "BertForTokenClassification", 3, "per-token logits", POST_LN, 13),  # + classifier
    # pre-LN, 3 blocks; block 0 has no attn_norm
    ("modernbert", "ModernBertModel", 2, "mean-pooled embedding",
     {"attn_in": 2, "mlp_in": 3, "mlp_down": 3, "attn_out": 3}, 12),
])
def test_more_encoder_families_convert_end_to_end(arch, architecture, inputs, compared, groups, int8,
                                                  tiny_checkpoints, tmp_path):
    code, result, stderr = _convert(tiny_recipe_dict(tiny_checkpoints[arch]), tmp_path)
    assert code == 0, stderr
    manifest = _manifest(tmp_path)
    assert manifest["source"]["architecture"] == architecture
    assert manifest["model"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"][:inputs]
    assert collections.Counter(g["group"] for g in manifest["smoothing"]["groups"]) == groups
    target = manifest["targets"]["cpu-onnxruntime"]
    assert target["build"]["fused_linears"] == int8 and target["build"]["unfused_linears"] == []
    metrics = target["parity"]["metrics"]
    assert target["parity"]["passed"] and metrics["compared"] == compared and metrics["mean_cosine"] >= 0.95
    if arch == "bert-ner":  # one value per unmasked token: 4 windows x 64 tokens
        assert metrics["tokens"] == 4 * 64 and metrics["top1_agreement"] is not None


def test_encoder_metric_pools_over_the_mask_and_counts_top1():
    ref = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [50.0, 50.0]]])  # third token is padding
    cand = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-50.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(ref, mask), torch.tensor([[0.5, 0.5]]))
    acc = EncoderAccumulator("last_hidden_state")
    acc.add(mask, ref, cand)
    rotated = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])  # pooled (0.5, 0) vs (0.5, 0.5): cos 1/sqrt(2)
    acc.add(mask, ref, rotated)
    m = acc.metrics(2)
    assert m.min_cosine == pytest.approx(2 ** -0.5) and m.mean_cosine == pytest.approx((1 + 2 ** -0.5) / 2)
    assert m.tokens == 4 and m.top1_agreement is None and m.ppl_ratio is None
    logits = EncoderAccumulator("logits")
    logits.add(torch.ones(2, 3), torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([[2.0, 1.5], [1.0, 0.0]]))
    assert logits.metrics(1).top1_agreement == 0.5
    # token classification: per unmasked token; the padded token's disagreement does not count
    tokens = EncoderAccumulator("logits")
    tokens.add(mask, torch.tensor([[[2.0, 1.0], [0.0, 1.0], [1.0, 0.0]]]),
               torch.tensor([[[2.0, 1.0], [1.0, 0.0], [0.0, 1.0]]]))
    m = tokens.metrics(1)
    assert m.top1_agreement == 0.5 and m.min_cosine == pytest.approx(0.0) and m.compared == "per-token logits"


def _stablelm_checkpoint(folder):
    from transformers import StableLmConfig, StableLmForCausalLM
    from tiny_models import tiny_tokenizer

    torch.manual_seed(0)
    config = StableLmConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    StableLmForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer(CALIBRATION_TEXT.read_text()).save_pretrained(folder)
    return folder


STABLELM_MAP = {
    "blocks": "model.layers",
    "linears": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "groups": [
        {"name": "attn_in", "prev": "input_layernorm", "prev_kind": "norm",
         "balance": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]},
        {"name": "mlp_in", "prev": "post_attention_layernorm", "prev_kind": "norm",
         "balance": ["mlp.gate_proj", "mlp.up_proj"]},
    ],
    "head_group": {"name": "head_in", "prev": "model.norm", "prev_kind": "norm", "balance": ["lm_head"]},
}


def test_recipe_layer_map_converts_a_class_the_table_lacks(tmp_path):
    assert "StableLmForCausalLM" not in ARCHITECTURES
    data = tiny_recipe_dict(_stablelm_checkpoint(tmp_path / "ckpt"))
    code, _, stderr = _convert(data, tmp_path)
    assert code == 1 and "StableLmForCausalLM is not supported" in stderr and "`architecture:`" in stderr
    assert len(stderr.strip().splitlines()) == 1
    data["architecture"] = STABLELM_MAP
    code, result, stderr = _convert(data, tmp_path)
    assert code == 0, stderr
    manifest = _manifest(tmp_path)
    assert [g["group"] for g in manifest["smoothing"]["groups"]] == ["attn_in", "mlp_in"] * 2
    assert manifest["targets"]["cpu-onnxruntime"]["build"]["fused_linears"] == 14
    assert manifest["recipe"]["architecture"]["blocks"] == "model.layers"


def test_recipe_layer_map_with_a_wrong_path_is_a_one_line_error(tmp_path):
    data = tiny_recipe_dict(_stablelm_checkpoint(tmp_path / "ckpt"))
    data["architecture"] = {**STABLELM_MAP, "linears": ["self_attn.qkv_proj"]}
    code, _, stderr = _convert(data, tmp_path)
    assert code == 1 and "model.layers.0.self_attn.qkv_proj" in stderr and len(stderr.strip().splitlines()) == 1


def test_readme_layer_map_example_is_a_valid_recipe_section():
    import re

    from conftest import ROOT
    from converter.models.archs import spec_from_recipe
    from converter.recipe import Architecture

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "models.md").read_text(), re.S)
    example = next(b for b in blocks if b.startswith("architecture:"))
    spec = spec_from_recipe(Architecture.model_validate(yaml.safe_load(example)["architecture"]))
    phi3 = ARCHITECTURES["Phi3ForCausalLM"]  # the example describes Phi-3's fused layout
    assert spec.linears == phi3.linears and set(spec.groups) <= set(phi3.groups)
    assert spec.head_group == phi3.head_group


@pytest.mark.parametrize("arch", ["gpt2", "gemma", "gemma2", "gemma3"])
def test_tied_lm_head_of_new_families_is_quantized_and_fused(arch, tmp_path):
    from converter.export.exporter import export_fp32, insert_qdq
    from converter.models.archs import arch_spec, block_linear_names
    from converter.models.text import Windows
    from converter.quant.calibrate import collect_input_amax
    from converter.quant.quantize import plan_quantization
    from converter.quant.smooth import smooth
    from converter.recipe import Export, Quantization, Smoothing
    from converter.targets.onnxruntime import build_onnxruntime
    from tiny_models import build_tiny

    model = build_tiny(arch)
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embed  # tied in the config
    embedding = embed.detach().clone()
    spec = arch_spec(model)
    names = block_linear_names(model, spec)
    windows = Windows(torch.randint(0, 300, (8, 48), generator=torch.Generator().manual_seed(1)), "t", 8)
    report = smooth(model, collect_input_amax(model, names, windows, 4).amax, Smoothing(alpha=0.5), spec)
    assert any(g.group == "head_in" for g in report.groups)  # final norm -> lm_head, untied first
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    stats = collect_input_amax(model, names, windows, 4)
    plan = plan_quantization(model, names, stats.absmax_ranges(), Quantization(exclude=[]))
    fp32 = export_fp32(model, tmp_path / "fp32.onnx", Export())
    int8 = insert_qdq(fp32, tmp_path / "model.onnx", model, plan, Export())
    build = build_onnxruntime("cpu-onnxruntime", int8.path, tmp_path, plan)
    assert "lm_head" in plan.linears and build.fused_linears == len(plan.linears) and build.unfused_linears == []


def test_encoder_windows_are_wrapped_in_its_special_tokens(tmp_path, write_recipe):
    from converter.models.text import token_windows
    from converter.recipe import TextData, load_recipe
    from tiny_models import tiny_tokenizer

    text = CALIBRATION_TEXT.read_text()[:4000]
    (tmp_path / "t.txt").write_text(text)
    recipe = load_recipe(write_recipe(tiny_recipe_dict(tmp_path)))
    tok = tiny_tokenizer(text)
    data = TextData(files=[str(tmp_path / "t.txt")], seq_len=16, num_samples=1000)
    plain = token_windows(recipe, data, tok, shuffle=False)
    wrapped = token_windows(recipe, data, tok, shuffle=False, wrap=(7, 9))
    assert wrapped.input_ids.shape[1] == 16 and (wrapped.input_ids[:, 0] == 7).all() and (wrapped.input_ids[:, -1] == 9).all()
    # the text in between is the same token stream, 14 tokens per window
    assert torch.equal(wrapped.input_ids[:, 1:-1].reshape(-1)[:64], plain.input_ids.reshape(-1)[:64])
    assert wrapped.sha256 != plain.sha256  # the stage cache must not mix them up
    led = token_windows(recipe, data, tok, shuffle=False, wrap=(7, None))  # a decoder's BOS, nothing after
    assert led.input_ids.shape[1] == 16 and (led.input_ids[:, 0] == 7).all()
    assert torch.equal(led.input_ids[:, 1:].reshape(-1)[:64], plain.input_ids.reshape(-1)[:64])
    assert len({plain.sha256, wrapped.sha256, led.sha256}) == 3


def test_window_wrap_follows_what_the_tokenizer_adds_to_a_text():
    """An encoder's windows get the tokens its tokenizer puts around every text, found the same way as
    a decoder's BOS: a tokenizer that names [CLS]/[SEP] but never adds them gives plain windows."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from converter.models.text import window_wrap

    def word_tokenizer(template: str | None):
        words = ["[UNK]", "[CLS]", "[SEP]", "[BOS]", "the", "patient", "is", "afebrile", "."]
        core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        if template:
            core.post_processor = processors.TemplateProcessing(
                single=template, special_tokens=[(w, words.index(w)) for w in ("[CLS]", "[SEP]", "[BOS]")])
        return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", cls_token="[CLS]",
                                       sep_token="[SEP]", bos_token="[BOS]", eos_token="[SEP]")

    bert = word_tokenizer("[CLS] $A [SEP]")
    assert bert("the patient")["input_ids"] == [1, 4, 5, 2]
    assert window_wrap(bert, "encoder") == (1, 2)
    assert window_wrap(bert, "decoder") == (1, None)  # a decoder never gets the trailing token
    assert window_wrap(word_tokenizer("[BOS] $A"), "encoder") == (3, None)
    assert window_wrap(word_tokenizer("[CLS] [BOS] $A"), "encoder") is None  # two tokens: not a single wrap
    named_only = word_tokenizer(None)
    assert named_only.cls_token_id == 1 and named_only("the patient")["input_ids"] == [4, 5]
    assert window_wrap(named_only, "encoder") is None and window_wrap(named_only, "decoder") is None


@pytest.mark.parametrize("arch, attr, value", [
    ("opt", "do_layer_norm_before", False),  # OPT-350m: post-LN
    ("bloom", "apply_residual_connection_post_layernorm", True),
    ("phi", "qk_layernorm", True),
])
def test_variant_the_table_entry_does_not_describe_is_refused(arch, attr, value):
    from converter.errors import UserError
    from converter.models.archs import arch_spec, check_spec
    from tiny_models import build_tiny

    model = build_tiny(arch)
    check_spec(model, arch_spec(model), "architecture table")  # the default variant is fine
    setattr(model.config, attr, value)
    with pytest.raises(UserError, match=f"{attr} = .*architecture:"):
        check_spec(model, arch_spec(model), "architecture table")


@pytest.mark.parametrize("class_name", sorted(ARCHITECTURES))
def test_every_table_entry_names_modules_its_class_has(class_name):
    """Classes without a tiny checkpoint of their own (RoBERTa token classification, ...) are built
    from their family's tiny config, so a wrong path in any entry fails here, not on a user's model."""
    import transformers

    from converter.models.archs import check_spec, conv1d_to_linear
    from tiny_models import TINY_CONFIGS

    cls = getattr(transformers, class_name)
    config = next(c for c in (make() for make in TINY_CONFIGS.values()) if isinstance(c, cls.config_class))
    model = cls._from_config(config)
    conv1d_to_linear(model)  # as the load stage does (GPT-2)
    check_spec(model, ARCHITECTURES[class_name], "architecture table")
