import re
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe_dict

from converter.errors import UserError
from converter.recipe import apply_overrides, load_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipes_validate(path):
    loaded = load_recipe(path)
    assert loaded.recipe.schema_version == 1
    r = loaded.recipe
    for f in r.calibration.files + [f for s in r.parity.sets for f in s.files] + r.selection.files:
        assert loaded.path(f).is_file(), f


# the benchmarks' out-of-domain evaluation text (bench/accuracy.py): no recipe may calibrate on it
BENCH_EVAL = ROOT / "recipes" / "data" / "clinical-reports.txt"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_calibration_and_evaluation_texts_do_not_overlap(path):
    loaded = load_recipe(path)
    calib = {loaded.path(f).resolve() for f in loaded.recipe.calibration.files}
    evals = {loaded.path(f).resolve() for s in loaded.recipe.parity.sets for f in s.files} | {BENCH_EVAL.resolve()}
    chosen_on = {loaded.path(f).resolve() for f in loaded.recipe.selection.files}
    assert not calib & evals and not chosen_on & evals
    calib_lines, eval_lines, selection_lines = (
        {l.strip() for f in files for l in f.read_text().splitlines() if len(l.strip()) > 40}
        for files in (calib, evals, chosen_on))
    assert not calib_lines & eval_lines
    assert not selection_lines & eval_lines  # alpha, exclude and fallback choices never see held-out text


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_decoders_evaluate_on_two_texts_one_outside_the_calibration_domain(path):
    r = load_recipe(path).recipe
    if "minilm" in path.name:  # the encoder recipe: one held-out text
        return
    names = {s.name: set(s.files) for s in r.parity.sets}
    assert len(names) >= 2
    assert names["clinical"] == {"data/clinical-reports.txt"} and "data/gpl-3.0.txt" in r.calibration.files


def test_unknown_key_is_named(write_recipe):
    data = yaml.safe_load((ROOT / "recipes" / "smollm2-135m-cpu.yaml").read_text())
    data["smoothing"]["alhpa"] = 0.7
    with pytest.raises(UserError, match=r"smoothing\.alhpa: unknown key"):
        load_recipe(write_recipe(data))


def test_set_override_parses_yaml_values():
    loaded = load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml",
                         ["smoothing.alpha=0.65", "smoothing.enabled=false", "quantization.exclude=[]"])
    assert loaded.recipe.smoothing.alpha == 0.65
    assert loaded.recipe.smoothing.enabled is False
    assert loaded.recipe.quantization.exclude == []


def test_set_override_with_typo_fails_like_a_recipe_typo():
    with pytest.raises(UserError, match=r"smoothing\.alpah: unknown key"):
        load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml", ["smoothing.alpah=0.8"])


@pytest.mark.parametrize("bad", ["smoothing.alpha", "=3", "smoothing.alpha.x=1"])
def test_malformed_overrides(bad):
    with pytest.raises(UserError):
        load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml", [bad])


def test_out_of_range_and_unsupported_values_are_rejected():
    with pytest.raises(UserError, match=r"smoothing\.alpha"):
        load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml", ["smoothing.alpha=1.5"])
    with pytest.raises(UserError, match=r"quantization\.activations\.mode"):
        load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml", ["quantization.activations.mode=runtime"])
    with pytest.raises(UserError, match=r"quantization\.activations: .*per_token granularity needs mode: dynamic"):
        load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml", ["quantization.activations.granularity=per_token"])
    with pytest.raises(UserError, match=r"unknown target"):
        load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml", ["targets=[h100-tensorrtt]"])
    # prompts are cut from the evaluation windows: a longer prompt would silently be the whole window
    with pytest.raises(UserError, match=r"parity: .*generation\.prompt_tokens 300 is more than eval\[license\]\.seq_len 256"):
        load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml", ["parity.generation.prompt_tokens=300"])
    assert load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml", ["parity.generation.prompt_tokens=256"])
    single = ["parity.eval={files: [data/apache-2.0.txt], seq_len: 128}"]  # the one-mapping form names no set
    with pytest.raises(UserError, match=r"parity: .*generation\.prompt_tokens 200 is more than eval\.seq_len 128"):
        load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml", [*single, "parity.generation.prompt_tokens=200"])


def test_ort_attention_needs_ort_targets_and_a_kv_cache():
    shipped = ROOT / "recipes" / "smollm2-135m-cpu.yaml"
    assert load_recipe(shipped).recipe.export.attention == "onnxruntime"
    with pytest.raises(UserError, match=r"GroupQueryAttention, which h100-tensorrt cannot run; use export\.attention: onnx"):
        load_recipe(shipped, ["targets=[cpu-onnxruntime, h100-tensorrt]"])
    with pytest.raises(UserError, match=r"export\.attention onnxruntime .* needs export\.kv_cache: true"):
        load_recipe(shipped, ["export.kv_cache=false"])
    both = load_recipe(shipped, ["targets=[cpu-onnxruntime, h100-tensorrt]", "export.attention=onnx"])
    assert both.recipe.export.attention == "onnx"


def test_the_default_prompt_length_is_not_held_against_short_windows(tiny_checkpoints, write_recipe):
    data = tiny_recipe_dict(tiny_checkpoints["llama"])
    data["parity"]["eval"]["seq_len"] = 16  # shorter than the default 32 prompt tokens (encoders do not generate)
    assert load_recipe(write_recipe(data)).recipe.parity.generation.prompt_tokens == 32


def test_schema_version_mismatch(write_recipe):
    with pytest.raises(UserError, match="schema_version"):
        load_recipe(write_recipe({"schema_version": 99}))


@pytest.mark.parametrize("kind, message", [("folder", "is a folder, not a file"),
                                           ("latin-1", "is not UTF-8 text (invalid continuation byte at byte 9)")])
def test_a_recipe_that_is_not_a_utf8_file_is_named(tmp_path, kind, message):
    path = tmp_path / "recipe.yaml"
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="^" + re.escape(f"recipe {path} {message}")):
        load_recipe(path)


def test_relative_paths_resolve_against_recipe_folder(tmp_path, write_recipe):
    data = yaml.safe_load((ROOT / "recipes" / "smollm2-135m-cpu.yaml").read_text())
    loaded = load_recipe(write_recipe(data))
    assert loaded.path("data/x.txt") == tmp_path / "data" / "x.txt"
    assert loaded.path("/abs/x.txt") == Path("/abs/x.txt")


def test_bare_off_means_off_though_yaml_reads_it_as_false(write_recipe):
    data = tiny_recipe_dict(Path("model"))
    path = write_recipe(data)
    assert load_recipe(path, ["smoothing.search=off"]).recipe.smoothing.search == "off"
    text = path.read_text().replace("smoothing:\n", "smoothing:\n  search: off\n")
    path.write_text(text)
    assert yaml.safe_load(text)["smoothing"]["search"] is False
    assert load_recipe(path).recipe.smoothing.search == "off"
    with pytest.raises(UserError, match="smoothing.search"):
        load_recipe(path, ["smoothing.search=on"])  # true is not a search method


def test_an_integer_version_is_the_same_version_as_its_string(write_recipe):
    path = write_recipe(tiny_recipe_dict(Path("model")))
    assert load_recipe(path, ["output.version=12"]).recipe.output.version == "12"
    assert load_recipe(path, ["output.version='12'"]).recipe.output.version == "12"
    with pytest.raises(UserError, match="output.version"):
        load_recipe(path, ["output.version=true"])


def test_apply_overrides_does_not_mutate_input():
    raw = {"a": {"b": 1}}
    out = apply_overrides(raw, ["a.b=2", "a.c.d=x"])
    assert raw == {"a": {"b": 1}} and out == {"a": {"b": 2, "c": {"d": "x"}}}


def test_overrides_index_a_list_the_recipe_has():
    raw = {"parity": {"eval": [{"name": "a", "thresholds": {"max_kl": 0.1}}, {"name": "b"}]}}
    out = apply_overrides(raw, ["parity.eval.1.thresholds.max_kl=null", "parity.eval.0.thresholds.max_kl=0.2"])
    assert out["parity"]["eval"] == [{"name": "a", "thresholds": {"max_kl": 0.2}}, {"name": "b", "thresholds": {"max_kl": None}}]
    with pytest.raises(UserError, match=r"parity.eval.2: parity.eval is a list of 2; index it with 0..1"):
        apply_overrides(raw, ["parity.eval.2.thresholds.max_kl=1"])
    with pytest.raises(UserError, match=r"parity.eval.b: parity.eval is a list of 2"):
        apply_overrides(raw, ["parity.eval.b.name=c"])
    with pytest.raises(UserError, match=r"parity.eval.0.name is not a section"):
        apply_overrides(raw, ["parity.eval.0.name.x=1"])
    shipped = load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml", ["parity.eval.1.thresholds.max_ppl_ratio=1.5"])
    assert shipped.recipe.parity.sets[1].thresholds.max_ppl_ratio == 1.5


def test_resolved_recipe_fills_defaults_and_digest_tracks_changes():
    a = load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml")
    b = load_recipe(ROOT / "recipes" / "smollm2-135m-cpu.yaml", ["smoothing.alpha=0.5"])
    assert a.resolved_dict()["quantization"]["activations"]["range"] == "absmax"
    assert a.digest() != b.digest()
