"""`convert.py targets`: every registered target and whether this machine can build and run it.

Also prints the build plans that `--dry-run` recorded for GPU targets.
"""

from __future__ import annotations

import json
import sys

from converter.cli.args import ArgumentParser


def target_rows() -> list[dict]:
    """One row per target: backend, hardware, available here and why not, plus the CPU-side checks."""
    from converter.targets.registry import TARGETS
    from converter.targets.tensorrt_rtx import RTX_MODULE, rtx_available

    rows = []
    for name, target in TARGETS.items():
        ok, why = target.availability()
        rows.append({"target": name, "backend": target.backend, "hardware": target.hardware,
                     "builds_and_runs_here": ok, "why_not": None if ok else why,
                     "dry_run": target.gpu})
        if target.int8_here is not None:
            rows[-1]["int8_here"] = target.int8_here()
    rows.append({"target": "(check) tensorrt-acceptance", "backend": "tensorrt-rtx parser + builder",
                 "hardware": "CPU", "builds_and_runs_here": rtx_available(),
                 "why_not": None if rtx_available() else f"missing Python module: {RTX_MODULE}", "dry_run": False})
    return rows


def cmd_targets(argv: list[str]) -> int:
    """List targets; exit 0 (listing is not a failure even when nothing GPU-based is available)."""
    p = ArgumentParser(prog="convert.py targets", description="List deployment targets and what runs here.")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = target_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        status = "yes" if row["builds_and_runs_here"] else "no"
        line = f"{row['target']:<30} {row['backend']:<30} here: {status:<3}  {row['hardware']}"
        if row.get("int8_here"):
            line += f"\n{'':<30} int8 here: {row['int8_here']}"
        if row["why_not"]:
            line += f"\n{'':<30} why not: {row['why_not']}" + ("; --dry-run records its plan" if row["dry_run"] else "")
        print(line)
    return 0


def print_plans(manifest: dict) -> None:
    """Print (stderr) the build plan of every GPU target that --dry-run planned but did not build."""
    for name, v in manifest.get("targets", {}).items():
        build = v["build"]
        if build.get("dry_run"):
            plan = {k: val for k, val in build.items() if k not in ("int8_kernels", "fused_linears", "unfused_linears", "op_counts")}
            print(f"build plan for {name} (not built):\n{json.dumps(plan, indent=2)}", file=sys.stderr)
