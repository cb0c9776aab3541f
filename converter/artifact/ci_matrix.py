"""CI job matrix: one job per recipe x target, each with the runner labels its hardware needs.

    convert.py matrix recipes/ --format github   # {"include": [...]} on one line, for $GITHUB_OUTPUT
    convert.py matrix recipes/ --format json     # the same entries, indented

Runner labels are the target's own data (`Target.ci_labels`, in the registry). GitHub-hosted
runners have no GPUs, so GPU targets go to self-hosted runners labelled with their exact GPU: an
engine is tied to its compute capability / gfx arch, and a generic GPU label could build an A100
engine on an H100.
"""

from __future__ import annotations

import json
from pathlib import Path

from converter.errors import UserError

def ci_labels(target_name: str) -> list[str]:
    """Labels of the runner a target's build must run on (the target's `ci_labels`).

    Raises:
        UserError: a target registered without runner labels.
    """
    from converter.targets.registry import TARGETS

    labels = TARGETS[target_name].ci_labels
    if not labels:
        raise UserError(f"target {target_name}: no CI runner labels; give its registry entry ci_labels")
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
                "runs-on": ci_labels(target),
                "artifact": f"{r.output.name}-{r.output.version}-{target}",
            })
    return jobs


def render(jobs: list[dict], fmt: str) -> str:
    """`github`: a one-line `{"include": [...]}` for `fromJSON()`; `json`: the list, indented."""
    if fmt == "github":
        return json.dumps({"include": jobs}, separators=(",", ":"))
    return json.dumps(jobs, indent=2)
