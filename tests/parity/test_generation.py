"""The KV-cache artifact end to end: decode-step calibration, generation parity, `convert.py generate`."""

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from converter.export import kv_graph
from converter.models.text import Windows
from converter.parity.generation import greedy_graph, greedy_torch, session_step
from converter.quant.calibrate import run_hooked
from converter.targets.runners import onnxruntime_session
from runcli import run_cli
from tiny_models import build_tiny


def _convert_kv(checkpoint, tmp, decode_windows: int, generation: dict, thresholds: dict | None = None):
    """Convert `checkpoint` with a KV-cache recipe through the CLI: (recipe, artifact, manifest, result)."""
    data = tiny_recipe_dict(checkpoint)
    data["export"] = {"kv_cache": True}
    data["calibration"].update(decode_windows=decode_windows, decode_steps=8)
    data["parity"]["generation"] = generation
    if thresholds:
        data["parity"]["thresholds"] = thresholds
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    code, stdout, stderr = run_cli(recipe, "--output-dir", tmp / "out", "--json", "--quiet")
    assert code == 0, stderr
    result = json.loads(stdout)
    artifact = tmp / "out" / result["name"] / result["version"]
    return recipe, artifact, json.loads((artifact / "manifest.json").read_text()), result


@pytest.fixture(scope="module")
def kv_artifact(tiny_checkpoints, tmp_path_factory):
    _, artifact, manifest, result = _convert_kv(
        tiny_checkpoints["qwen2"], tmp_path_factory.mktemp("kv-cli"), 4,
        {"prompts": 3, "prompt_tokens": 12, "max_new_tokens": 10}, {"min_token_agreement": 0.8})
    return artifact, manifest, result


def test_manifest_records_kv_io_and_decode_calibration(kv_artifact):
    artifact, manifest, _ = kv_artifact
    inputs, outputs = kv_graph.io_names(2)
    assert manifest["model"]["inputs"] == inputs and manifest["model"]["outputs"] == outputs
    assert manifest["model"]["kv_cache"] is True
    cal = manifest["calibration"]
    assert (cal["decode_windows"], cal["decode_steps"], cal["decode_tokens"]) == (4, 8, 32)
    assert cal["tokens"] == cal["windows"] * 64 + 32  # prefill tokens + decoded tokens


def test_generation_parity_is_reported_and_gated(kv_artifact):
    artifact, manifest, result = kv_artifact
    parity = manifest["targets"]["cpu-onnxruntime"]["parity"]
    g = parity["generation"]
    assert g["prompts"] == 3 and g["new_tokens"] == 10 and len(g["first_divergence"]) == 3
    assert all(len(t) == 10 for t in g["reference_tokens"] + g["candidate_tokens"])
    same = [sum(a == b for a, b in zip(r, c)) / 10 for r, c in zip(g["reference_tokens"], g["candidate_tokens"])]
    assert g["token_agreement"] == pytest.approx(np.mean(same))
    assert parity["thresholds"]["min_token_agreement"] == 0.8
    assert result["targets"]["cpu-onnxruntime"]["parity"]["generation"]["token_agreement"] == g["token_agreement"]
    assert "greedy token agreement" in (artifact / "parity_report.md").read_text()
    # the prompts are the first 12 tokens of the evaluation windows, and the artifact's greedy
    # tokens from them are what the INT8 graph generates in ONNX Runtime
    step = session_step(onnxruntime_session(artifact / "model.onnx"))
    layout = kv_graph.graph_kv_layout(artifact / "model.onnx")
    from transformers import AutoTokenizer

    from conftest import EVALUATION_TEXT

    ids = AutoTokenizer.from_pretrained(str(artifact))(EVALUATION_TEXT.read_text(), add_special_tokens=False)["input_ids"]
    assert list(greedy_graph(step, layout, ids[:12], 10)) == g["candidate_tokens"][0]
    # stepwise: each step a fresh prefill of the prompt and the reference's tokens before it (the
    # evaluation windows are consecutive 64-token cuts of the text, so prompt k starts at 64 k)
    picks = [[next(greedy_graph(step, layout, ids[64 * k : 64 * k + 12] + ref[:i], 1)) for i in range(10)]
             for k, ref in enumerate(g["reference_tokens"])]
    stepwise = np.mean([np.mean([a == b for a, b in zip(p, r)]) for p, r in zip(picks, g["reference_tokens"])])
    assert g["stepwise_agreement"] == pytest.approx(stepwise)
    assert "stepwise agreement" in (artifact / "parity_report.md").read_text()


def test_triton_config_carries_the_cache_tensors(kv_artifact):
    artifact, manifest, _ = kv_artifact
    from converter.artifact.triton import CONFIG, parse_config

    folder = artifact / "triton" / f"{manifest['name']}-cpu-onnxruntime"
    config = parse_config((folder / CONFIG).read_text(), "kv")
    dims = {t.name: list(t.dims) for t in [*config.input, *config.output]}
    layout = kv_graph.graph_kv_layout(artifact / "model.onnx")
    assert config.max_batch_size == 8  # every tensor has a dynamic batch axis
    assert dims["past_key_values.1.value"] == [layout.kv_heads, -1, layout.head_dim]
    assert dims["present.0.key"] == [layout.kv_heads, -1, layout.head_dim]
    assert dims["attention_mask"] == [-1] and dims["logits"] == [-1, 320]


def _generate_json(artifact, prompt: str, new_tokens: int, *extra):
    """(`generate --json` record, the artifact's tokenizer, the greedy tokens ORT gives for `ids`)."""
    from transformers import AutoTokenizer

    code, stdout, stderr = run_cli("generate", artifact, "--prompt", prompt, "--max-new-tokens", new_tokens, "--json",
                                   *extra)
    assert code == 0, stderr
    tok = AutoTokenizer.from_pretrained(str(artifact))
    step = session_step(onnxruntime_session(artifact / "model.onnx"))
    layout = kv_graph.graph_kv_layout(artifact / "model.onnx")
    return json.loads(stdout), tok, lambda ids: list(greedy_graph(step, layout, ids, new_tokens, tok.eos_token_id))


def test_generate_streams_the_artifacts_greedy_tokens(kv_artifact):
    artifact, _, _ = kv_artifact
    record, tok, greedy = _generate_json(artifact, "Licensed under the", 7)
    expected = greedy(tok("Licensed under the", add_special_tokens=False)["input_ids"])
    assert record["tokens"] == expected and record["new_tokens"] == len(expected) and record["threads"] == 0
    one_thread, _, _ = _generate_json(artifact, "Licensed under the", 7, "--threads", 1)
    assert one_thread["threads"] == 1 and one_thread["tokens"] == expected
    assert record["text"] == tok.decode(expected, skip_special_tokens=True)
    code, stdout, _ = run_cli("generate", artifact, "--prompt", "Licensed under the", "--max-new-tokens", 7)
    assert code == 0 and stdout == "Licensed under the" + record["text"] + "\n"


def test_generate_chat_answers_the_prompt_as_a_user_message(kv_artifact, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    artifact = tmp_path / "chat"
    shutil.copytree(kv_artifact[0], artifact)
    config = json.loads((artifact / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}Q: {{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} A:{% endif %}")
    (artifact / "tokenizer_config.json").write_text(json.dumps(config))
    code, stdout, stderr = run_cli("generate", artifact, "--prompt", "the License", "--chat", "--max-new-tokens", 6,
                                   "--json")
    assert code == 0, stderr
    record = json.loads(stdout)
    tok = AutoTokenizer.from_pretrained(str(artifact))
    expected_prompt = tok("Q: the License A:", add_special_tokens=False)["input_ids"]
    assert record["chat"] is True and record["prompt_tokens"] == expected_prompt
    step = session_step(onnxruntime_session(artifact / "model.onnx"))
    layout = kv_graph.graph_kv_layout(artifact / "model.onnx")
    assert record["tokens"] == list(greedy_graph(step, layout, expected_prompt, 6, tok.eos_token_id))
    code, stdout, _ = run_cli("generate", artifact, "--prompt", "the License", "--chat", "--max-new-tokens", 6)
    assert code == 0 and stdout == record["text"] + "\n"  # the reply alone: the template is not echoed
    code, stdout, stderr = run_cli("generate", kv_artifact[0], "--prompt", "the License", "--chat")
    assert code == 1 and stdout == "" and "no chat template" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, why", [
    (["--prompt", "x"], "is not an artifact"),
    (["--prompt", "x", "--max-new-tokens", "0"], "expected a positive integer"),
    (["--prompt", "x", "--threads", "-2"], "--threads -2: expected 0 (ONNX Runtime's default) or a positive count"),
    # the tiny model has 512 positions: "x" is 1 token
    (["--prompt", "x", "--max-new-tokens", "512"], "--prompt plus --max-new-tokens is 513 tokens, more than the "
                                                   "checkpoint's context of 512 positions"),
])
def test_generate_bad_input_is_one_line_exit_1(tmp_path, kv_artifact, argv, why):
    target = tmp_path if why == "is not an artifact" else kv_artifact[0]
    code, stdout, stderr = run_cli("generate", target, *argv)
    assert code == 1 and stdout == "" and why in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_decode_calibration_records_the_models_own_greedy_steps():
    model = build_tiny("llama")
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    windows = Windows(ids, "t", 1).with_decode(1, 5)
    seen = []
    batches, tokens = run_hooked(model, ["lm_head"], windows, 1, "t", lambda n, x: seen.append(x.clone()))
    assert (batches, tokens) == (1, 20 + 5)
    assert [tuple(x.shape[:2]) for x in seen] == [(1, 20)] + [(1, 1)] * 5  # prefill, then only the steps
    # the decode steps read the model's own greedy continuation of the 15-token prefix
    continuation = greedy_torch(model, ids[0, :15].tolist(), 5)
    full = torch.tensor([ids[0, :15].tolist() + continuation])  # step k feeds generated token k at 15 + k
    with torch.no_grad():
        hidden = model.model(input_ids=full).last_hidden_state  # (1, 20, C): lm_head input = final norm output
    torch.testing.assert_close(torch.cat(seen[1:], dim=1), hidden[:, 15:], atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # and those differ from the corpus tokens' activations
        assert (hidden[:, 15:] - model.model(input_ids=ids).last_hidden_state[:, 15:]).abs().max() > 1e-2
    assert windows.sha256 != Windows(ids, "t", 1).with_decode(1, 6).sha256  # settings reach the cache key


def _word_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "USER", "BOT", "EOT", "what", "is", "a", "cyst", "?", "nodule"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="EOT")
    tok.chat_template = chat_template
    return tok


def test_prompts_file_lines_are_wrapped_in_the_chat_template(tmp_path):
    from converter.parity.generation import generation_prompts
    from converter.recipe import Generation

    (tmp_path / "prompts.txt").write_text("what is a cyst ?\n\nnodule\n")
    template = ("{% for m in messages %}USER {{ m['content'] }} EOT {% endfor %}"
                "{% if add_generation_prompt %}BOT{% endif %}")
    tok = _word_tokenizer(template)
    plain = generation_prompts(None, Generation(prompts_file="prompts.txt"), tok, tmp_path)
    chat = generation_prompts(None, Generation(prompts_file="prompts.txt", chat_template=True), tok, tmp_path)
    assert plain == [[4, 5, 6, 7, 8], [9]]  # blank lines skipped
    assert chat == [[1, 4, 5, 6, 7, 8, 3, 2], [1, 9, 3, 2]]


def test_chat_template_without_one_in_the_tokenizer_is_a_user_error(tmp_path):
    from converter.errors import UserError
    from converter.parity.generation import generation_prompts
    from converter.recipe import Generation

    (tmp_path / "prompts.txt").write_text("what is a cyst ?\n")
    with pytest.raises(UserError, match="no chat template"):
        generation_prompts(None, Generation(prompts_file="prompts.txt", chat_template=True), _word_tokenizer(None),
                           tmp_path)


def _bos_word_tokenizer():
    """The word tokenizer with a post-processor that puts [BOS] before and EOT after every text."""
    from tokenizers import processors

    tok = _word_tokenizer(None)
    core = tok.backend_tokenizer
    core.add_special_tokens(["[BOS]"])
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A EOT", special_tokens=[("[BOS]", core.token_to_id("[BOS]")), ("EOT", 3)])
    return tok


def test_prompts_get_the_tokenizers_leading_bos_and_never_its_trailing_eos(tmp_path):
    from converter.artifact.generate import prompt_ids
    from converter.models.text import added_special_tokens, text_ids, window_wrap
    from converter.parity.generation import generation_prompts
    from converter.recipe import Generation

    bos_tok, plain_tok = _bos_word_tokenizer(), _word_tokenizer(None)
    bos = bos_tok.convert_tokens_to_ids("[BOS]")
    assert bos_tok("what is a cyst ?")["input_ids"] == [bos, 4, 5, 6, 7, 8, 3]  # what HF's default adds
    assert added_special_tokens(bos_tok) == ([bos], [3]) and added_special_tokens(plain_tok) == ([], [])
    assert text_ids(bos_tok, "what is a cyst ?") == [bos, 4, 5, 6, 7, 8]  # an EOS would end the text
    assert prompt_ids(bos_tok, "what is a cyst ?", chat=False) == [bos, 4, 5, 6, 7, 8]
    assert prompt_ids(plain_tok, "what is a cyst ?", chat=False) == [4, 5, 6, 7, 8]
    (tmp_path / "prompts.txt").write_text("what is a cyst ?\nnodule\n")
    assert generation_prompts(None, Generation(prompts_file="prompts.txt"), bos_tok, tmp_path) == [
        [bos, 4, 5, 6, 7, 8], [bos, 9]]
    assert window_wrap(bos_tok, "decoder") == (bos, None) and window_wrap(plain_tok, "decoder") is None
    assert text_ids(bos_tok, "") == []  # an empty prompt stays empty (and is refused), not a lone BOS


@pytest.fixture(scope="module")
def bos_artifact(tmp_path_factory):
    """A tiny Llama whose tokenizer starts every text with <bos> (as Gemma's and Llama 3's do), converted."""
    from tiny_models import save_tiny_checkpoint

    from conftest import CALIBRATION_TEXT

    tmp = tmp_path_factory.mktemp("bos")
    checkpoint = save_tiny_checkpoint("llama", tmp / "ckpt", CALIBRATION_TEXT.read_text(), bos=True)
    return _convert_kv(checkpoint, tmp, 2, {"prompts": 2, "prompt_tokens": 12, "max_new_tokens": 6})[:3]


def test_a_bos_tokenizer_calibrates_and_evaluates_windows_that_start_with_bos(bos_artifact):
    from transformers import AutoTokenizer

    from converter.models.text import token_windows
    from converter.recipe import load_recipe

    recipe_path, artifact, manifest = bos_artifact
    recipe = load_recipe(recipe_path)
    tok = AutoTokenizer.from_pretrained(str(artifact))
    bos = tok.bos_token_id
    r = recipe.recipe
    calib = token_windows(recipe, r.calibration, tok, shuffle=True, wrap=(bos, None))
    assert calib.input_ids.shape[1] == r.calibration.seq_len and (calib.input_ids[:, 0] == bos).all()
    assert (calib.input_ids[:, 1:] != bos).all()  # the text itself never holds one
    plain = token_windows(recipe, r.calibration, tok, shuffle=True)
    # the manifest records the digests of what the conversion calibrated and evaluated on
    decode = (r.calibration.decode_windows, r.calibration.decode_steps)
    assert manifest["calibration"]["sha256"] == calib.with_decode(*decode).sha256
    assert manifest["calibration"]["sha256"] != plain.with_decode(*decode).sha256
    evaluation = token_windows(recipe, r.parity.eval, tok, shuffle=False, wrap=(bos, None))
    assert manifest["evaluation"]["sha256"] == evaluation.sha256


def test_generate_puts_the_bos_before_the_prompt(bos_artifact):
    _, artifact, _ = bos_artifact
    record, tok, greedy = _generate_json(artifact, "Licensed under the", 4)
    assert record["prompt_tokens"] == [tok.bos_token_id] + tok("Licensed under the", add_special_tokens=False)["input_ids"]
    assert record["tokens"] == greedy(record["prompt_tokens"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_bf16_yardstick_of_a_streamed_model_is_the_whole_models(arch, tmp_path):
    """Block-streamed in bfloat16 (parity's yardstick at a size not held whole): the whole model cast
    to bfloat16 gives the same tokens, rates and logits; the fp32 logits differ, so the cast is tested."""
    from converter.models.archs import arch_spec
    from converter.models.lazy import StreamedModel
    from converter.parity.generation import greedy_torch_many, torch_batch_logits, yardstick, yardstick_streamed
    from converter.quant.sequential import streamed_batch_logits
    from tiny_models import sharded_bf16

    _, whole = sharded_bf16(arch, tmp_path)
    ids = torch.randint(0, 300, (5, 16), generator=torch.Generator().manual_seed(4)).tolist()
    prompts = [ids[0][:9], ids[1][:9], ids[2][:5], ids[3][:9], ids[4][:12]]
    reference = greedy_torch_many(whole, prompts, 6)
    fp32_logits = torch_batch_logits(whole)(prompts)
    spec = arch_spec(whole)
    streamed = StreamedModel(tmp_path, spec, dtype=torch.bfloat16)
    bf16 = whole.to(torch.bfloat16)
    assert yardstick_streamed(streamed, prompts, reference, batch_size=2) == yardstick(bf16, prompts, reference)
    got, expected = streamed_batch_logits(streamed, 2)(prompts), torch_batch_logits(bf16)(prompts)
    for g, e, f in zip(got, expected, fp32_logits, strict=True):
        assert np.array_equal(g, e) and not np.array_equal(g, f)
