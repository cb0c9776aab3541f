import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, tiny_recipe_dict
from converter.pipeline import STAGES
from runcli import NAME, VERSION, run_cli, run_subprocess


@pytest.fixture(scope="module")
def converted(tiny_checkpoints, tmp_path_factory):
    """One successful tiny conversion shared by the tests that read its artifact."""
    tmp = tmp_path_factory.mktemp("cli")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_checkpoints["llama"])))
    out = tmp / "artifacts"
    code, stdout, stderr = run_cli(recipe, "--output-dir", out, "--json", "--quiet")
    assert code == 0, stderr
    return recipe, out, json.loads(stdout), stderr


def test_artifact_is_complete_and_manifest_hashes_match(converted):
    _, out, _, _ = converted
    folder = out / NAME / VERSION
    for name in ("model.onnx", "manifest.json", "parity_report.json", "parity_report.md", "recipe.yaml",
                 "tokenizer.json", "config.json"):
        assert (folder / name).is_file(), name
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert manifest["files"] == on_disk
    assert manifest["recipe"]["output"] == {"name": NAME, "version": VERSION}
    assert manifest["model"]["quantized_linears"] == 14 and manifest["model"]["float_linears"] == ["lm_head"]
    assert manifest["tools"]["onnxruntime"] and manifest["tools"]["torch"].startswith("2.")
    assert len(manifest["source"]["sha256"]) == len(manifest["calibration"]["sha256"]) == 64
    # the manifest is written inside *package*: it records every stage before it
    assert [s["name"] for s in manifest["stages"]] == list(STAGES[:-1])
    assert (folder.stat().st_mode & 0o777) == 0o755
    # nothing half-written is left beside the published version
    assert sorted(p.name for p in (out / NAME).iterdir()) == [VERSION]


def test_fused_attention_converts_end_to_end(tiny_checkpoints, tmp_path):
    """export.attention onnxruntime through the whole CLI: pre-flight, rewrite, generation parity."""
    import onnx

    data = tiny_recipe_dict(tiny_checkpoints["smollm3"])  # one layer with rotary, one without
    data["export"] = {"kv_cache": True, "attention": "onnxruntime"}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    code, stdout, stderr = run_cli(recipe, "--output-dir", tmp_path / "out", "--json", "--quiet")
    assert code == 0, stderr
    folder = Path(json.loads(stdout)["artifact"])
    nodes = [n for n in onnx.load(str(folder / "model.onnx")).graph.node if n.op_type == "GroupQueryAttention"]
    assert [next(a.i for a in n.attribute if a.name == "do_rotary") for n in nodes] == [1, 0]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["checks"]["tensorrt_rtx"]["passed"] is None  # ONNX Runtime's own kernel: not TensorRT's
    generation = manifest["targets"]["cpu-onnxruntime"]["parity"]["generation"]
    assert generation["prompts"] > 0 and 0 <= generation["token_agreement"] <= 1


def test_json_result_and_parity_report_agree(converted):
    _, out, result, _ = converted
    assert result["status"] == "ok" and result["artifact"] == str(out / NAME / VERSION)
    assert [s["name"] for s in result["stages"]] == list(STAGES)
    target = result["targets"]["cpu-onnxruntime"]
    assert target["fused_linears"] == 14 and target["parity"]["passed"]
    report = json.loads((out / NAME / VERSION / "parity_report.json").read_text())["cpu-onnxruntime"]
    assert report["metrics"] == target["parity"]["metrics"]
    markdown = (out / NAME / VERSION / "parity_report.md").read_text()
    assert "PASSED" in markdown and f"{report['metrics']['ppl_ratio']:.4f}" in markdown
    m = report["metrics"]
    assert 0.9 < m["ppl_ratio"] < 1.1 and m["mean_cosine"] > 0.99
    assert {c["name"] for c in report["comparator"]} == {"export_fidelity", "int8_vs_fp32_onnx"}


def test_inspect_prints_contents_and_metrics(converted):
    _, out, _, _ = converted
    code, stdout, stderr = run_cli("inspect", out / NAME / VERSION)
    assert code == 0 and "model.onnx" in stderr and "perplexity" in stderr
    code, stdout, _ = run_cli("inspect", out / NAME / VERSION, "--json")
    assert code == 0 and "model.onnx" in json.loads(stdout)["files"]


def test_verify_detects_a_flipped_byte(converted, tmp_path):
    _, out, _, _ = converted
    copy = tmp_path / "copy"
    shutil.copytree(out / NAME / VERSION, copy)
    assert run_cli("verify", copy)[0] == 0
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.onnx").write_bytes(bytes(data))
    code, _, stderr = run_cli("verify", copy)
    assert code == 1 and "changed: model.onnx" in stderr
    code, stdout, _ = run_cli("verify", copy, "--json")
    record = json.loads(stdout)
    assert code == 1 and record["status"] == "error" and record["problems"] == ["changed: model.onnx"]
    assert record["ok"] is False and "1 file(s) do not match" in record["error"]


@pytest.mark.parametrize("damage, problem", [("delete", "missing: tokenizer.json"),
                                             ("add", "unexpected: report/notes.txt")])
def test_verify_names_a_missing_or_an_unexpected_file(converted, tmp_path, damage, problem):
    _, out, _, _ = converted
    copy = tmp_path / "copy"
    shutil.copytree(out / NAME / VERSION, copy)
    if damage == "delete":
        (copy / "tokenizer.json").unlink()
    else:
        (copy / "report" / "notes.txt").write_text("not in the manifest")
    code, stdout, stderr = run_cli("verify", copy, "--json")
    assert code == 1 and json.loads(stdout)["problems"] == [problem], stdout
    assert stderr.strip() == f"error: {copy}: 1 file(s) do not match the manifest: {problem}"


def test_the_artifact_name_folder_instead_of_a_version_names_its_versions(converted):
    _, out, _, _ = converted
    code, _, stderr = run_cli("verify", out / NAME)
    assert code == 1 and stderr.strip() == (f"error: {out / NAME} is not an artifact (no manifest.json); "
                                            f"versions in it: {VERSION} (pass one of those folders)")


@pytest.mark.parametrize("command", ["inspect", "verify", "generate", "triton"])
@pytest.mark.parametrize("manifest", ["{not json", "[1, 2]"])
def test_a_damaged_manifest_is_one_line_exit_1(converted, tmp_path, command, manifest):
    _, out, _, _ = converted
    copy = tmp_path / "copy"
    shutil.copytree(out / NAME / VERSION, copy)
    (copy / "manifest.json").write_text(manifest)
    extra = {"generate": ["--prompt", "x"], "triton": ["--repo", tmp_path / "repo"]}.get(command, [])
    code, stdout, stderr = run_cli(command, copy, *extra)
    why = "is not valid JSON" if manifest.startswith("{") else "has no 'files' table"
    assert code == 1 and stdout == "" and why in stderr and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize("damaged", ["model.onnx", "tokenizer.json"])
def test_generate_on_a_truncated_file_names_it_in_one_line(converted, tmp_path, damaged):
    _, out, _, _ = converted
    copy = tmp_path / "copy"
    shutil.copytree(out / NAME / VERSION, copy)
    (copy / damaged).write_bytes((copy / damaged).read_bytes()[:1000])  # an interrupted copy
    code, stdout, stderr = run_cli("generate", copy, "--prompt", "x")
    lines = stderr.strip().splitlines()
    assert code == 1 and stdout == "" and len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {copy} is damaged (changed: {damaged}): "), stderr


def test_generate_refuses_an_encoder_artifact(converted, tmp_path):
    _, out, _, _ = converted
    copy = tmp_path / "copy"
    shutil.copytree(out / NAME / VERSION, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "decoder"
    manifest["model"]["kind"] = "encoder"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, stdout, stderr = run_cli("generate", copy, "--prompt", "x")
    assert code == 1 and stdout == "" and "generate needs a decoder" in stderr, stderr


def test_progress_says_how_much_data_each_stage_reads(converted, tmp_path):
    from transformers import AutoTokenizer

    from conftest import CALIBRATION_TEXT

    recipe, _, _, _ = converted
    code, _, stderr = run_cli(recipe, "--output-dir", tmp_path, "--set", "calibration.num_samples=100000",
                              "--set", "export.kv_cache=true", "--set", "calibration.decode_windows=1000")
    assert code == 0, stderr
    tokenizer = AutoTokenizer.from_pretrained(yaml.safe_load(recipe.read_text())["source"]["path"])
    total = len(tokenizer(CALIBRATION_TEXT.read_text(), add_special_tokens=False)["input_ids"]) // 64
    assert stderr.splitlines()[1] == (
        f"  LlamaForCausalLM: calibration {total} windows x 64 tokens (num_samples 100000: the text holds {total})"
        f" + {total} x 32 decode steps (calibration.decode_windows 1000: there are {total} calibration windows); "
        "evaluation 4 windows x 64 tokens; 4 generation prompts (parity.generation.prompts 8: there are 4 "
        "evaluation windows)")


def test_existing_version_is_not_overwritten_without_force(converted):
    recipe, out, _, _ = converted
    model = out / NAME / VERSION / "model.onnx"
    before = model.stat().st_mtime_ns
    code, _, stderr = run_cli(recipe, "--output-dir", out, "--quiet")
    assert code == 1 and "already exists" in stderr and "--force" in stderr
    assert model.stat().st_mtime_ns == before


def test_force_replaces_and_set_overrides_reach_the_artifact(converted):
    recipe, out, _, _ = converted
    code, _, stderr = run_cli(recipe, "--output-dir", out, "--quiet", "--force", "--set", "smoothing.alpha=0.75")
    assert code == 0, stderr
    manifest = json.loads((out / NAME / VERSION / "manifest.json").read_text())
    assert manifest["recipe"]["smoothing"]["alpha"] == 0.75
    assert {g["alpha"] for g in manifest["smoothing"]["groups"]} == {0.75}
    assert sorted(p.name for p in (out / NAME).iterdir()) == [VERSION]


def test_parity_failure_exits_2_publishes_nothing_and_keeps_the_report(tiny_checkpoints, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_checkpoints["qwen2"])))
    out = tmp_path / "artifacts"
    code, stdout, stderr = run_cli(recipe, "--output-dir", out, "--quiet", "--json", "--set", "parity.thresholds.max_kl=0")
    assert code == 2
    assert not (out / NAME / VERSION).exists()
    rejected = out / NAME / "_rejected" / VERSION
    assert "kl_mean" in (rejected / "parity_report.md").read_text()
    assert not (rejected / "model.onnx").exists()
    assert json.loads(stdout)["status"] == "parity_failed"
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("parity failure:") and "kl_mean" in last and str(rejected) in last
    assert "Traceback" not in stderr
    assert sorted(p.name for p in (out / NAME).iterdir()) == ["_rejected"]
    # the same version passing later replaces the stale rejection
    code, _, stderr = run_cli(recipe, "--output-dir", out, "--quiet")
    assert code == 0, stderr
    assert sorted(p.name for p in (out / NAME).iterdir()) == [VERSION]


def _pickle_only(tmp_path, source):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((source / "config.json").read_bytes())
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    return folder


def _with_tokenizer(tmp_path, source, case: str):
    """A copy of the checkpoint `source` without tokenizer files, or with a tokenizer whose ids for
    words of the calibration text lie past the model's embedding table (another model's)."""
    from transformers import AutoConfig, AutoTokenizer

    folder = tmp_path / case
    shutil.copytree(source, folder)
    tokenizer = AutoTokenizer.from_pretrained(source)
    for path in folder.glob("tokenizer*"):
        path.unlink()
    if case == "another_models_tokenizer":
        rows = AutoConfig.from_pretrained(source).vocab_size
        tokenizer.add_tokens([f"<unused{i}>" for i in range(rows - len(tokenizer))] + ["License"])
        tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["unknown_key", "missing_checkpoint", "pickle_only", "bad_yaml", "seq_len_over_context",
                                  "generation_over_context", "non_utf8_data", "output_dir_is_a_file",
                                  "no_tokenizer", "empty_tokenizer", "another_models_tokenizer",
                                  "exclude_matches_nothing", "range_override_matches_nothing",
                                  "fused_attention_narrow_rotary"])
def test_user_errors_exit_1_with_one_line(case, tiny_checkpoints, tmp_path):
    data = tiny_recipe_dict(tiny_checkpoints["llama"])
    expected = {"unknown_key": "calibration.num_sample: unknown key", "missing_checkpoint": "does not exist",
                # Llama's tokenizer class fails to build without its files; GPT-2's builds empty (0 tokens)
                "no_tokenizer": "the tokenizer could not be loaded (Couldn't instantiate the backend tokenizer",
                "empty_tokenizer": "the tokenizer is empty (no tokenizer.json, tokenizer.model or vocabulary files)",
                # an index error deep in calibration otherwise
                "another_models_tokenizer": "calibration data: the tokenizer gives token id 320 but the model "
                                            "embeds only 320 ids",
                # a typo would leave the linear quantized (or on the default range method), silently
                "exclude_matches_nothing": "quantization.exclude: 'lm_haed' matches none of the 15 linears of "
                                           "LlamaForCausalLM (they are named like 'model.layers.0.self_attn.q_proj'",
                "range_override_matches_nothing": "quantization.activations.range_overrides: '*.down_prj' matches none",
                "pickle_only": "only pickle weights", "bad_yaml": "invalid YAML",
                # the tiny models have 512 positions: an index error deep in calibration or generation otherwise
                "seq_len_over_context": "parity.eval.seq_len is 520 tokens, more than the checkpoint's context of 512",
                "generation_over_context": "generation prompt plus parity.generation.max_new_tokens is 513 tokens",
                "non_utf8_data": "is not UTF-8 text (invalid continuation byte at byte 3)",
                "output_dir_is_a_file": "artifacts is a file, not a folder",
                # at load, not after calibration and smoothing (the rewrite itself runs in the export stage)
                "fused_attention_narrow_rotary": "export.attention onnxruntime: rotary over 4 of 16 head "
                                                 "dimensions; ONNX Runtime's GroupQueryAttention needs a multiple "
                                                 "of 16"}[case]
    out = tmp_path / "artifacts"
    if case == "non_utf8_data":
        (tmp_path / "latin-1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
        data["calibration"]["files"] = [str(tmp_path / "latin-1.txt")]
    elif case == "output_dir_is_a_file":
        out.write_text("")
    elif case == "seq_len_over_context":
        data["parity"]["eval"]["seq_len"] = 520
    elif case == "generation_over_context":
        data["parity"]["generation"] = {"prompt_tokens": 13, "max_new_tokens": 500}
    elif case == "unknown_key":
        data["calibration"]["num_sample"] = 3
    elif case == "missing_checkpoint":
        data["source"]["path"] = str(tmp_path / "no-such-folder")
    elif case == "pickle_only":
        data["source"]["path"] = str(_pickle_only(tmp_path, tiny_checkpoints["llama"]))
    elif case == "exclude_matches_nothing":
        data["quantization"] = {"exclude": ["model.layers.*.mlp.down_proj", "lm_haed"]}
    elif case == "range_override_matches_nothing":
        data["quantization"] = {"activations": {"range_overrides": {"*.down_prj": "mse"}}}
    elif case == "fused_attention_narrow_rotary":
        data["source"]["path"] = str(tiny_checkpoints["gpt-neox"])
        data["export"] = {"kv_cache": True, "attention": "onnxruntime"}
    elif case.endswith("tokenizer"):
        source = tiny_checkpoints["gpt2" if case == "empty_tokenizer" else "llama"]
        data["source"]["path"] = str(_with_tokenizer(tmp_path, source, case))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("calibration: [unclosed" if case == "bad_yaml" else yaml.safe_dump(data))
    proc = run_subprocess(recipe, "--output-dir", out, "--quiet")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not (out / NAME).exists() or not any((out / NAME).iterdir())


@pytest.mark.parametrize("argv, why", [
    (["recipes/smollm2-135m-cpu.yaml", "--sett", "x=1"], "convert.py: unrecognized arguments: --sett x=1"),
    (["recipes/smollm2-135m-cpu.yaml", "--build-number", "abc"], "argument --build-number: invalid int value"),
    (["generate"], "convert.py generate: the following arguments are required: artifact, --prompt"),
    (["targets", "--bogus"], "convert.py targets: unrecognized arguments: --bogus"),
])
def test_a_bad_command_line_exits_1_not_2(argv, why):
    proc = run_subprocess(*argv)  # argparse's own exit 2 would read as a parity failure in CI
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and why in lines[0], proc.stderr
    proc = run_subprocess(*argv, "--json")  # a CI job reading --json gets a document on failure too
    assert proc.returncode == 1 and json.loads(proc.stdout) == {"status": "error", "error": lines[0][len("error: "):]}


def _start_and_wait_mid_run(recipe_dict: dict, tmp_path):
    """A conversion in its own process, returned once its staging and work folders both exist, and a
    function listing the unfinished folders."""
    import os
    import time

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict))
    out, scratch = tmp_path / "artifacts", tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "convert.py", recipe, "--output-dir", out, "--quiet", "--no-cache"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)

    def unfinished():
        return list((out / NAME).glob(".staging-*")) + list(scratch.glob("convert-work-*"))

    deadline = time.monotonic() + 120
    while len(unfinished()) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(unfinished()) == 2  # mid-run: the staging folder and the work folder
    return proc, unfinished, env


def test_sigterm_removes_the_unfinished_artifact_and_work_files(tiny_checkpoints, tmp_path):
    """A cancelled CI job gets SIGTERM: nothing half-written may stay where a consumer looks."""
    import signal

    proc, unfinished, _ = _start_and_wait_mid_run(tiny_recipe_dict(tiny_checkpoints["llama"]), tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated" in stderr, stderr
    assert unfinished() == [] and list((tmp_path / "artifacts" / NAME).iterdir()) == []


def test_the_next_run_removes_what_a_sigkilled_run_left(tiny_checkpoints, tmp_path):
    """SIGKILL (the out-of-memory killer) leaves no way to clean up: the next conversion into the same
    folders removes the dead run's staging and work folders, and only those."""
    import fcntl
    import os
    import signal

    from converter import scratch as folders

    recipe_dict = tiny_recipe_dict(tiny_checkpoints["llama"])
    proc, unfinished, env = _start_and_wait_mid_run(recipe_dict, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    left = unfinished()
    assert len(left) == 2 and all((d / folders.LOCK).is_file() for d in left)
    foreign = tmp_path / "tmp" / "convert-work-not-ours"  # no lock file: another tool's, left alone
    foreign.mkdir()
    out = tmp_path / "artifacts"
    live = out / NAME / ".staging-1-live"  # a live run's: this process holds its lock
    live.mkdir()
    fd = os.open(live / folders.LOCK, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        done = subprocess.run([sys.executable, "convert.py", tmp_path / "recipe.yaml", "--output-dir", out,
                               "--quiet", "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("warning: removed 1 unfinished folder(s)") == 2, done.stderr  # staging, work
    assert unfinished() == [live, foreign]
    artifact = out / NAME / "1"
    assert list(artifact.rglob(folders.LOCK)) == [] and not any(p.name.startswith(".") for p in artifact.rglob("*"))


def test_internal_error_exits_3_with_traceback(converted, monkeypatch, tmp_path):
    recipe, _, _, _ = converted
    import converter.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(pipeline, "smooth", broken)
    # --no-cache: the shared stage cache would otherwise serve the smoothed model without calling smooth
    code, stdout, stderr = run_cli(recipe, "--output-dir", tmp_path / "out", "--quiet", "--no-cache", "--json")
    assert code == 3 and "Traceback" in stderr and "simulated bug" in stderr
    assert json.loads(stdout) == {"status": "internal_error", "error": "RuntimeError: simulated bug"}
    assert not any(p for p in (tmp_path / "out" / NAME).iterdir())  # staging removed


def test_alpha_search_and_range_method_reach_the_manifest(tiny_checkpoints, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_checkpoints["qwen3"])))
    out = tmp_path / "artifacts"
    code, _, stderr = run_cli(recipe, "--output-dir", out, "--quiet", "--set", "smoothing.search=per_group",
                              "--set", "smoothing.alpha_grid=[0.2,0.5,0.8]",
                              "--set", "quantization.activations.range_overrides={'*.down_proj': mse}")
    assert code == 0, stderr
    manifest = json.loads((out / NAME / VERSION / "manifest.json").read_text())
    search = manifest["smoothing"]["search"]
    assert search["mode"] == "per_group" and len(search["chosen"]) == 2 * 4
    applied = {f"model.layers.{g['block']}.{g['group']}": g["alpha"] for g in manifest["smoothing"]["groups"]}
    assert applied == search["chosen"]
    for key, errors in search["errors"].items():
        assert search["chosen"][key] == [0.2, 0.5, 0.8][errors.index(min(errors))]
    down = manifest["quantization"]["model.layers.0.mlp.down_proj"]
    assert down["range_method"] == "mse" and down["act_amax"] <= down["act_absmax"]
    assert manifest["quantization"]["model.layers.0.mlp.up_proj"]["range_method"] == "absmax"


def test_quantization_report_and_plots_match_the_manifest(converted):
    from PIL import Image

    from converter.artifact.layer_report import COLUMNS, _cell

    _, out, _, _ = converted
    folder = out / NAME / VERSION
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = manifest["layers"]
    alpha = manifest["recipe"]["smoothing"]["alpha"]  # an earlier test may have republished it
    assert len(rows) == 14 and all(r["alpha"] == alpha and not r["float"] for r in rows)
    for name in ("quantization_report.md", "quantization_report.html", "activation_channels.png", "quantization_errors.png"):
        assert f"report/{name}" in manifest["files"], name
    for png in ("activation_channels.png", "quantization_errors.png"):
        with Image.open(folder / "report" / png) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    table = [l for l in (folder / "report" / "quantization_report.md").read_text().splitlines() if l.startswith("| model.")]
    assert len(table) == len(rows)
    for line, row in zip(table, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells == [_cell(fmt, row[key]) for key, _, fmt in COLUMNS]
        q = manifest["quantization"][row["linear"]]
        assert row["act_absmax_after"] == q["act_absmax"] and row["weight_error"] == pytest.approx(q["weight_rel_error"] ** 2)
        assert row["act_absmax_before"] > row["act_absmax_after"]  # planted outliers were smoothed away
    assert "<table" in (folder / "report" / "quantization_report.html").read_text()
