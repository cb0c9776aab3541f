"""CI job matrix: one job per recipe x target with runner labels."""

import json

import yaml

from conftest import ROOT
from runcli import run_cli


def test_matrix_of_the_shipped_recipes_has_one_job_per_recipe_and_target():
    code, stdout, stderr = run_cli("matrix", ROOT / "recipes", "--format", "json")
    assert code == 0, stderr
    jobs = json.loads(stdout)
    expected = set()
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        for target in raw.get("targets", ["cpu-onnxruntime"]):
            expected.add((path.name, target))
    assert len(jobs) == len(expected) > 0
    assert {(job["recipe"].rsplit("/", 1)[-1], job["target"]) for job in jobs} == expected
    cpu = [j for j in jobs if j["target"] == "cpu-onnxruntime"]
    assert cpu and all(j["runs-on"] == ["ubuntu-latest"] for j in cpu)


def test_github_format_is_one_line_with_include():
    code, stdout, _ = run_cli("matrix", ROOT / "recipes", "--format", "github")
    assert code == 0 and len(stdout.strip().splitlines()) == 1
    assert json.loads(stdout)["include"] == json.loads(run_cli("matrix", ROOT / "recipes")[1])


def test_a_bad_recipe_is_named(tmp_path):
    (tmp_path / "good.yaml").write_text((ROOT / "recipes" / "smollm2-135m-cpu.yaml").read_text())
    (tmp_path / "bad.yaml").write_text("schema_version: 1\ntargets: [no-such-target]\n")
    code, _, stderr = run_cli("matrix", tmp_path)
    assert code == 1 and "bad.yaml" in stderr and len(stderr.strip().splitlines()) == 1


def test_two_recipes_publishing_the_same_version_are_refused(tmp_path):
    shipped = (ROOT / "recipes" / "smollm2-135m-cpu.yaml").read_text()
    (tmp_path / "a.yaml").write_text(shipped)
    (tmp_path / "b.yaml").write_text(shipped.replace("alpha: 0.8", "alpha: 0.7"))
    code, stdout, stderr = run_cli("matrix", tmp_path)
    assert code == 1 and stdout == "" and stderr.strip() == (
        f"error: recipes {tmp_path / 'a.yaml'} and {tmp_path / 'b.yaml'} both produce smollm2-135m-instruct-w8a8 "
        "version 1; give one of them another output.name or output.version")
    (tmp_path / "b.yaml").write_text(shipped.replace('version: "1"', 'version: "2"'))
    assert run_cli("matrix", tmp_path)[0] == 0


def test_readme_workflow_is_valid_yaml_that_converts_verifies_and_uploads():
    import re

    block = re.search(r"```yaml\n(.*?)```", (ROOT / "docs" / "deploy.md").read_text(), re.S).group(1)
    jobs = yaml.safe_load(block)["jobs"]
    runs = "\n".join(s.get("run", "") for job in jobs.values() for s in job["steps"])
    uses = [s.get("uses", "") for job in jobs.values() for s in job["steps"]]
    assert "convert.py matrix recipes/ --format github" in runs and "fromJSON" in jobs["convert"]["strategy"]["matrix"]
    assert "--build-number" in runs and "convert.py verify" in runs and "convert.py triton" in runs
    assert sum(u.startswith("actions/upload-artifact") for u in uses) == 2
