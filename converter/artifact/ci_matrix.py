"""CI job matrix: one job per recipe x target, each with the runner labels its hardware needs.

    convert.py matrix recipes/ --format github   # {"include": [...]} on one line, for $GITHUB_OUTPUT
    convert.py matrix recipes/ --format json     # the same entries, indented

Runner labels are data: by target name first, else by the target's backend. GitHub-hosted runners
have no GPUs, so GPU targets go to self-hosted runners labelled with their GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from converter.errors import UserError

# An engine is tied to its GPU (compute capability / gfx arch), so each GPU target asks for a runner
# with that exact GPU; a generic GPU label could build an A100 engine on an H100.
RUNNER_LABELS_BY_TARGET: dict[str, list[str]] = {
    "cpu-onnxruntime": ["ubuntu-latest"],
    "a100-tensorrt": ["self-hosted", "linux", "x64", "gpu-a100"],
    "h100-tensorrt": ["self-hosted", "linux", "x64", "gpu-h100"],
    "mi250x-migraphx": ["self-hosted", "linux", "x64", "gpu-mi250x"],
    "mi300-migraphx": ["self-hosted", "linux", "x64", "gpu-mi300"],
}
RUNNER_LABELS_BY_BACKEND: dict[str, list[str]] = {
    "onnxruntime": ["ubuntu-latest"],
    "tensorrt": ["self-hosted", "linux", "x64", "gpu-nvidia"],
    "migraphx": ["self-hosted", "linux", "x64", "gpu-amd"],
}


def runner_labels(target_name: str) -> list[str]:
    """Labels of the runner a target's build must run on.

    Raises:
        UserError: a target whose backend has no runner labels.
    """
    from converter.targets.registry import TARGETS

    if target_name in RUNNER_LABELS_BY_TARGET:
        return list(RUNNER_LABELS_BY_TARGET[target_name])
    target = TARGETS[target_name]
    labels = getattr(target, "runner_labels", None) or RUNNER_LABELS_BY_BACKEND.get(target.backend)
    if not labels:
        raise UserError(f"target {target_name}: no CI runner labels for backend {target.backend!r}; "
                        f"known: {sorted(RUNNER_LABELS_BY_BACKEND)}")
    return list(labels)


def recipe_files(paths: list[Path]) -> list[Path]:
    """Every `*.yaml` / `*.yml` directly in the given folders, plus the files given, sorted.

    Raises:
        UserError: a path that does not exist, or no recipe at all.
    """
    files: set[Path] = set()
    for path in paths:
        if path.is_dir():
            files.update(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        elif path.is_file():
            files.add(path)
        else:
            raise UserError(f"{path} does not exist")
    if not files:
        raise UserError(f"no recipes (*.yaml) in {', '.join(map(str, paths))}")
    return sorted(files)


def job_matrix(paths: list[Path]) -> list[dict]:
    """One entry per recipe x target: recipe file, artifact name and version, target, runner labels.

    Raises:
        UserError: a recipe that does not validate (named), or a target without runner labels.
    """
    from converter.recipe import load_recipe

    jobs = []
    producers: dict[tuple[str, str], Path] = {}
    for file in recipe_files(paths):
        r = load_recipe(file).recipe
        other = producers.setdefault((r.output.name, r.output.version), file)
        if other != file:  # two jobs would publish, and upload, the same artifact
            raise UserError(f"recipes {other} and {file} both produce {r.output.name} version {r.output.version}; "
                            "give one of them another output.name or output.version")
        for target in r.targets:
            jobs.append({
                "recipe": file.as_posix(),
                "name": r.output.name,
                "version": r.output.version,
                "target": target,
                "runs-on": runner_labels(target),
                "artifact": f"{r.output.name}-{r.output.version}-{target}",
            })
    return jobs


def render(jobs: list[dict], fmt: str) -> str:
    """`github`: a one-line `{"include": [...]}` for `fromJSON()`; `json`: the list, indented."""
    if fmt == "github":
        return json.dumps({"include": jobs}, separators=(",", ":"))
    return json.dumps(jobs, indent=2)
