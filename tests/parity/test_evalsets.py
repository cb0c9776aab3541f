"""Evaluation sets and the selection text: each set its own row and gates, stepwise and BF16 rows, the
memorized-text warning, and a selection text that may never be an evaluation text."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from conftest import CALIBRATION_TEXT, EVALUATION_TEXT, ROOT, tiny_recipe_dict
from converter.errors import UserError
from converter.parity.metrics import MEMORIZED_PPL
from converter.recipe import load_recipe
from runcli import run_cli

OTHER_TEXT = ROOT / "recipes" / "data" / "clinical-reports.txt"
NO_GATES = {"max_ppl_ratio": None, "min_mean_cosine": None, "min_min_cosine": None, "min_top1_agreement": None,
            "max_kl": None}


def _write(tmp_path, data: dict, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _two_sets(checkpoint, first=EVALUATION_TEXT, second=OTHER_TEXT, **thresholds) -> dict:
    """A tiny KV-cache recipe judged on two named sets; `thresholds`: set name -> its own gates."""
    data = tiny_recipe_dict(checkpoint)
    data["export"] = {"kv_cache": True}
    data["calibration"].update(decode_windows=2, decode_steps=8)
    one = {"seq_len": 64, "num_samples": 3, "batch_size": 2}
    data["parity"] = {
        "eval": [{"name": "license", "files": [str(first)], **one, "thresholds": thresholds.get("license", {})},
                 {"name": "other", "files": [str(second)], **one, "thresholds": thresholds.get("other", {})}],
        "thresholds": NO_GATES,
        "generation": {"prompts": 3, "prompt_tokens": 12, "max_new_tokens": 8},
    }
    return data


def test_a_single_set_recipe_loads_as_before_with_the_same_thresholds(tmp_path):
    data = tiny_recipe_dict(tmp_path)
    data["parity"]["thresholds"] = {"max_kl": 0.07, "min_top1_agreement": None}
    r = load_recipe(_write(tmp_path, data)).recipe
    (only,) = r.parity.sets
    assert only.name == "eval" and not r.parity.named_sets
    assert only.thresholds == r.parity.thresholds and only.thresholds.max_kl == 0.07
    assert only.thresholds.min_top1_agreement is None and only.thresholds.max_ppl_ratio == 1.10  # defaults kept
    assert only.files == data["parity"]["eval"]["files"] and only.seq_len == 64
    assert isinstance(load_recipe(_write(tmp_path, data)).resolved_dict()["parity"]["eval"], dict)  # same form


def test_listed_sets_override_the_shared_thresholds_key_by_key_and_resolve_in_full(tmp_path):
    data = _two_sets(tmp_path, other={"max_kl": 0.5, "min_stepwise_agreement": 0.9})
    data["parity"]["thresholds"] = {"max_kl": 0.1, "min_top1_agreement": 0.7}
    loaded = load_recipe(_write(tmp_path, data))
    license_, other = loaded.recipe.parity.sets
    assert (license_.thresholds.max_kl, license_.thresholds.min_top1_agreement) == (0.1, 0.7)
    assert license_.thresholds.min_stepwise_agreement is None
    assert (other.thresholds.max_kl, other.thresholds.min_top1_agreement, other.thresholds.min_stepwise_agreement) == (
        0.5, 0.7, 0.9)
    # the resolved recipe (written into every artifact) loads back to the same sets
    again = load_recipe(_write(tmp_path, loaded.resolved_dict(), "resolved.yaml")).recipe.parity.sets
    assert again == [license_, other]


@pytest.mark.parametrize("change, why", [
    (lambda d: d["parity"]["eval"].append({**d["parity"]["eval"][0]}), "used more than once"),
    (lambda d: d["parity"].update(eval=[]), "at least one evaluation set"),
    (lambda d: d.update(selection={"files": [str(OTHER_TEXT)]}), r"selection.files .*clinical-reports.txt also in evaluation set other"),
    (lambda d: d["parity"]["eval"][0]["thresholds"].update(max_kll=1), "unknown key"),
])
def test_bad_sets_and_a_selection_that_is_evaluated_on_are_one_line_errors(tmp_path, change, why):
    data = _two_sets(tmp_path)
    change(data)
    with pytest.raises(UserError, match=why) as err:
        load_recipe(_write(tmp_path, data))
    assert "\n" not in str(err.value)


def test_yardstick_none_turns_it_off(tmp_path):
    data = _two_sets(tmp_path)
    assert load_recipe(_write(tmp_path, data)).recipe.parity.generation.yardstick == "bf16"  # default on
    data["parity"]["generation"]["yardstick"] = "none"
    assert load_recipe(_write(tmp_path, data)).recipe.parity.generation.yardstick is None


def test_a_selection_text_with_an_evaluation_texts_bytes_is_refused(tiny_checkpoints, tmp_path):
    copy = tmp_path / "renamed.txt"
    shutil.copy(OTHER_TEXT, copy)  # another name, the same text
    data = _two_sets(tiny_checkpoints["llama"])
    data["selection"] = {"files": [str(copy)], "seq_len": 64, "num_samples": 2}
    code, _, stderr = run_cli(_write(tmp_path, data), "--output-dir", tmp_path / "out", "--quiet")
    assert code == 1
    assert stderr.strip().splitlines()[-1] == (
        f"error: selection.files {copy} has the text of evaluation set other: choices tuned on it would flatter its "
        "parity gates; select on other text")


@pytest.fixture(scope="module")
def two_sets_run(tiny_checkpoints, tmp_path_factory):
    """The tiny Qwen2 KV artifact judged on two sets, no gates: (folder, manifest, stdout, stderr)."""
    tmp = tmp_path_factory.mktemp("two-sets")
    recipe = _write(tmp, _two_sets(tiny_checkpoints["qwen2"]))
    code, stdout, stderr = run_cli(recipe, "--output-dir", tmp / "out")
    assert code == 0, stderr
    artifact = tmp / "out" / "tiny-w8a8" / "1"
    return artifact, json.loads((artifact / "manifest.json").read_text()), stdout, stderr


def test_every_set_has_its_own_row_with_stepwise_and_bf16_yardstick(two_sets_run):
    artifact, manifest, stdout, stderr = two_sets_run
    parity = manifest["targets"]["cpu-onnxruntime"]["parity"]
    license_, other = parity["sets"]
    assert (license_["name"], other["name"]) == ("license", "other")
    assert license_["metrics"]["kl_mean"] != other["metrics"]["kl_mean"]  # measured on their own windows
    assert parity["metrics"] == license_["metrics"] and parity["generation"] == license_["generation"]  # as before
    assert [s["name"] for s in manifest["evaluation"]["sets"]] == ["license", "other"]
    assert manifest["evaluation"]["sets"][1]["files"] == [str(OTHER_TEXT)]
    for s in (license_, other):
        g = s["generation"]
        assert g["prompts"] == 3 and g["new_tokens"] == 8 and 0 <= g["stepwise_agreement"] <= 1
        y = g["yardstick"]
        assert y["dtype"] == "bfloat16" and len(y["tokens"]) == 3
        same = np.mean([np.mean([a == b for a, b in zip(r, c)]) for r, c in zip(g["reference_tokens"], y["tokens"])])
        assert y["token_agreement"] == pytest.approx(same)
    assert license_["generation"]["reference_tokens"] != other["generation"]["reference_tokens"]  # their own prompts
    markdown = (artifact / "parity_report.md").read_text()
    assert "## Evaluation set `license`" in markdown and "## Evaluation set `other`" in markdown
    assert markdown.count("yardstick: bfloat16") == 2
    table = stdout + stderr  # the summary table goes to the console
    assert "set other" in table and "set license" in table and "bfloat16 yardstick" in table


def test_bf16_yardstick_is_the_checkpoint_in_bfloat16():
    from tiny_models import build_tiny

    from converter.parity.generation import greedy_torch, yardstick

    model = build_tiny("llama").eval()
    prompts = [[int(t) for t in torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(i))]
               for i in range(3)]
    reference = [greedy_torch(model, p, 6) for p in prompts]
    bf16 = model.to(torch.bfloat16)
    y = yardstick(bf16, prompts, reference)
    assert y["tokens"] == [greedy_torch(bf16, p, 6) for p in prompts]  # batched equals one by one
    assert y["dtype"] == "bfloat16"
    assert y["token_agreement"] == pytest.approx(np.mean([np.mean(np.equal(r, t)) for r, t in zip(reference, y["tokens"])]))


def test_a_candidate_built_to_disagree_fails_the_stepwise_gate_of_its_set_only(two_sets_run, tiny_checkpoints, tmp_path):
    _, manifest, _, _ = two_sets_run
    good = {s["name"]: s["generation"]["stepwise_agreement"] for s in manifest["targets"]["cpu-onnxruntime"]["parity"]["sets"]}
    gate = good["other"]  # the properly converted artifact meets this
    data = _two_sets(tiny_checkpoints["qwen2"], other={"min_stepwise_agreement": gate})
    # built to disagree: clip every activation at its median magnitude
    data["quantization"] = {"activations": {"range": "percentile", "percentile": 50.01}}
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(_write(tmp_path, data), "--output-dir", out, "--quiet", "--json")
    assert code == 2, stderr
    report = json.loads((out / "tiny-w8a8" / "_rejected" / "1" / "parity_report.json").read_text())["cpu-onnxruntime"]
    license_, other = report["sets"]
    assert other["generation"]["stepwise_agreement"] < gate
    assert other["failures"] == [f"stepwise_agreement {other['generation']['stepwise_agreement']:.4g} (required >= {gate:g})"]
    assert license_["failures"] == [] and license_["passed"]  # no stepwise gate on this set
    assert report["failures"] == [f"other: {other['failures'][0]}"]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("parity failure:") and "other: stepwise_agreement" in last and "license:" not in last


def _memorizing_checkpoint(folder, passage: str):
    """The tiny Llama trained until it recites `passage` (repeated): perplexity there well below 3."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny_models import save_tiny_checkpoint

    save_tiny_checkpoint("llama", folder, CALIBRATION_TEXT.read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(folder)(passage * 3, add_special_tokens=False)["input_ids"]
    x = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    return folder


def test_memorized_text_warns_that_it_cannot_judge_the_artifact(tmp_path):
    passage = CALIBRATION_TEXT.read_text()[2000:2600]
    memorized = tmp_path / "memorized.txt"
    memorized.write_text(passage * 3)
    data = _two_sets(_memorizing_checkpoint(tmp_path / "ckpt", passage), first=memorized, second=EVALUATION_TEXT)
    data["parity"]["generation"] = {"enabled": False}
    code, _, stderr = run_cli(_write(tmp_path, data), "--output-dir", tmp_path / "out", "--json", "--quiet")
    assert code == 0, stderr
    artifact = tmp_path / "out" / "tiny-w8a8" / "1"
    parity = json.loads((artifact / "manifest.json").read_text())["targets"]["cpu-onnxruntime"]["parity"]
    license_, other = parity["sets"]  # the memorized text is the first set, "license"
    assert license_["metrics"]["reference_ppl"] < MEMORIZED_PPL <= other["metrics"]["reference_ppl"]
    (line,) = license_["warnings"]
    assert line.startswith("evaluation set license: FP32 perplexity") and "cannot judge the artifact" in line
    assert other["warnings"] == [] and parity["warnings"] == [line]
    assert [ln for ln in stderr.splitlines() if ln.startswith("warning:") and "cannot judge" in ln] == [
        f"warning: cpu-onnxruntime: {line}"]
    assert line in (artifact / "parity_report.md").read_text()
