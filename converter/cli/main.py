"""Command line: `convert.py RECIPE ...`, `convert.py inspect DIR`, `convert.py verify DIR`,
`convert.py generate DIR --prompt TEXT`, `convert.py serve DIR` (a real Triton server).

Exit codes: 0 success, 1 user error (one line, no traceback), 2 parity failure, 3 internal error
(with traceback). Progress and tables go to stderr; `--json` prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from converter.cli.args import ArgumentParser
from converter.errors import ParityFailure, UserError

EXIT_OK, EXIT_USER, EXIT_PARITY, EXIT_INTERNAL = 0, 1, 2, 3
SUBCOMMANDS = ("inspect", "verify", "generate", "targets", "triton", "serve", "matrix")


def _convert_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="convert.py", description="Convert an HF checkpoint to INT8 artifacts.",
                       epilog=f"Other commands: {', '.join(SUBCOMMANDS)} (convert.py inspect -h).")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe field, e.g. --set smoothing.alpha=0.8 (repeatable)")
    p.add_argument("--output-dir", type=Path, default=Path("artifacts"), help="default: ./artifacts")
    p.add_argument("--force", action="store_true", help="replace an existing artifact version")
    p.add_argument("--json", action="store_true", help="print a machine-readable result on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="GPU targets: print and record the exact build plan instead of building")
    p.add_argument("--build-number", type=int, metavar="N",
                   help="CI build number: artifact version <output.version>-build<N>, Triton version N")
    p.add_argument("--no-cache", action="store_true", help="compute every stage; read and write no cache")
    p.add_argument("--cache-dir", type=Path, help="stage cache (default $CONVERTER_CACHE_DIR or ~/.cache/...)")
    return p


def _artifact_parser(command: str, help_text: str) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=f"convert.py {command}", description=help_text)
    p.add_argument("artifact", type=Path, help="an artifact folder: artifacts/<name>/<version>")
    p.add_argument("--json", action="store_true")
    return p


def _summary(manifest: dict, artifact: Path | None, status: str, stages: list | None = None) -> dict:
    return {
        "status": status,
        "artifact": str(artifact) if artifact else None,
        "name": manifest.get("name"),
        "version": manifest.get("version"),
        "source_sha256": manifest.get("source", {}).get("sha256"),
        "quantized_linears": manifest.get("model", {}).get("quantized_linears"),
        "fallback": _fallback_summary(manifest.get("fallback")),
        "targets": {
            t: {"fused_linears": v["build"]["fused_linears"], "parity": v["parity"],
                **({"build": v["build"]} if "planned_engine_file" in v["build"] else {})}
            for t, v in manifest.get("targets", {}).items()
        },
        "stages": stages if stages is not None else manifest.get("stages", []),
        "peak_rss_mb": manifest.get("peak_rss_mb"),
    }


def _fallback_summary(fallback: dict | None) -> dict | None:
    if not fallback:
        return None
    return {"float_linears": fallback["fallback"], "float_mac_share": fallback["float_mac_share"],
            "target_met": fallback["target_met"], "final": fallback["final"]}


def _print_table(manifest: dict, artifact: Path | None) -> None:
    from rich.table import Table

    from converter.progress import console

    table = Table(title=f"{manifest['name']} {manifest['version']}", show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("artifact", str(artifact) if artifact else "(not published)")
    table.add_row("architecture", manifest["source"]["architecture"])
    model = manifest["model"]
    table.add_row("quantized linears", f"{model['quantized_linears']} (float: {', '.join(model['float_linears']) or 'none'})")
    if manifest.get("fallback"):
        from converter.artifact.package import fallback_outcome

        table.add_row("sensitivity fallback",
                      fallback_outcome(manifest["fallback"], manifest["recipe"]["quantization"]["fallback"]))
    for target, v in manifest["targets"].items():
        if v["parity"]["passed"] is None:  # a GPU target planned by --dry-run
            table.add_row(f"[bold]{target}[/bold]", f"planned: {v['build']['planned_engine_file']} (not built)")
            continue
        table.add_row(f"[bold]{target}[/bold]", "PASSED" if v["parity"]["passed"] else "[red]FAILED[/red]")
        table.add_row("  int8 kernels", ", ".join(f"{k} x{n}" for k, n in v["build"]["int8_kernels"].items()))
        if v["build"].get("fused_linears", 0) is None:  # MIGraphX: instructions do not name their linears
            table.add_row("  int8 linears", "unknown")
        sets = v["parity"].get("sets") or [{"name": "eval", "metrics": v["parity"]["metrics"],
                                            "generation": v["parity"].get("generation")}]  # older artifacts
        for s in sets:
            _set_rows(table, s, "    " if len(sets) > 1 else "  ", len(sets) > 1)
        for c in v["parity"]["comparator"]:
            value = c["max_absdiff"] if c["error_stat"] == "max" else c["mean_absdiff"]
            table.add_row(f"  polygraphy {c['name']}", f"{c['error_stat']} {value:.3g} ({'ok' if c['passed'] else 'FAIL'})")
    stages = manifest.get("stages", [])
    if stages:
        table.add_row("stages (s)", ", ".join(f"{s['name']} {s['seconds']:.1f}" for s in stages))
    table.add_row("peak memory", f"{manifest.get('peak_rss_mb', 0):.0f} MB")
    console.print(table)


def _set_rows(table, s: dict, indent: str, named: bool) -> None:
    """One evaluation set's rows of the summary table (under a row naming the set when there are several)."""
    m = s["metrics"]
    if named:
        table.add_row(f"  set {s['name']}", "PASSED" if s.get("passed", True) else "[red]FAILED[/red]")
    if m["ppl_ratio"] is not None:  # encoders: no perplexity, no KL
        table.add_row(f"{indent}perplexity FP32 -> INT8",
                      f"{m['reference_ppl']:.3f} -> {m['candidate_ppl']:.3f} (x{m['ppl_ratio']:.4f})")
    table.add_row(f"{indent}{m.get('compared', 'logits')} cosine mean / min", f"{m['mean_cosine']:.5f} / {m['min_cosine']:.5f}")
    if m["top1_agreement"] is not None:
        table.add_row(f"{indent}top-1 agreement", f"{m['top1_agreement']:.4f}")
    if m["kl_mean"] is not None:
        table.add_row(f"{indent}KL mean", f"{m['kl_mean']:.5f}")
    g = s.get("generation")
    if g:
        stepwise = g.get("stepwise_agreement")  # absent from artifacts written before it was reported
        table.add_row(f"{indent}greedy token agreement ({g['new_tokens']} tokens)",
                      f"{g['token_agreement']:.4f} (prefix {g['prefix_agreement']:.4f}"
                      + ("" if stepwise is None else f", stepwise {stepwise:.4f}") + ")")
        table.add_row(f"{indent}first divergence per prompt", ", ".join(str(d) for d in g["first_divergence"]))
        y = g.get("yardstick")
        if y:
            table.add_row(f"{indent}{y['dtype']} yardstick (token / stepwise)",
                          f"{y['token_agreement']:.4f} / {y['stepwise_agreement']:.4f}")
    for w in s.get("warnings", []):
        table.add_row(f"{indent}[yellow]warning[/yellow]", w)


def _cmd_convert(argv: list[str]) -> int:
    args = _convert_parser().parse_args(argv)
    from converter import progress

    from converter.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # before the heavy imports: recipe errors are fast
    progress.set_enabled(not args.quiet)
    progress.quiet_libraries()
    from converter.pipeline import convert

    try:
        if args.build_number is not None and args.build_number < 1:
            raise UserError(f"--build-number {args.build_number}: expected a positive integer")
        from converter.stage_cache import default_dir

        cache_dir = None if args.no_cache else (args.cache_dir or default_dir())
        result = convert(recipe, args.output_dir, force=args.force, dry_run=args.dry_run,
                         build_number=args.build_number, cache_dir=cache_dir)
    except ParityFailure as failure:
        manifest_path = Path(failure.report_dir) / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            _print_table(manifest, None)
            if args.json:
                print(json.dumps({**_summary(manifest, None, "parity_failed"), "report_dir": failure.report_dir}, indent=2))
        raise
    _print_table(result.manifest, result.artifact_dir)
    if args.dry_run:
        from converter.cli.targets import print_plans

        print_plans(result.manifest)
    if args.json:
        stages = [s.__dict__ for s in result.stages]
        print(json.dumps(_summary(result.manifest, result.artifact_dir, "ok", stages), indent=2))
    return EXIT_OK


def _cmd_inspect(argv: list[str]) -> int:
    args = _artifact_parser("inspect", "Show what an artifact holds and its metrics.").parse_args(argv)
    from converter.artifact.package import read_manifest

    manifest = read_manifest(args.artifact)
    if args.json:
        print(json.dumps({**_summary(manifest, args.artifact, "ok"), "files": manifest["files"]}, indent=2))
        return EXIT_OK
    _print_table(manifest, args.artifact)
    from converter.progress import console

    for name, digest in manifest["files"].items():
        size = (args.artifact / name).stat().st_size if (args.artifact / name).exists() else 0
        console.print(f"  {name:<32} {size / 1e6:10.2f} MB  sha256 {digest[:16]}")
    return EXIT_OK


def _cmd_verify(argv: list[str]) -> int:
    args = _artifact_parser("verify", "Re-hash an artifact's files against its manifest.").parse_args(argv)
    from converter.artifact.package import read_manifest, verify
    from converter.artifact.triton import verify_artifact_repository

    problems = verify(args.artifact)
    if not problems:  # files are intact: also re-parse the Triton configs strictly against the graph
        problems = verify_artifact_repository(args.artifact, read_manifest(args.artifact))
    if problems:
        raise UserError(f"{args.artifact}: {len(problems)} file(s) do not match the manifest: {'; '.join(problems)}",
                        details={"artifact": str(args.artifact), "ok": False, "problems": problems})
    if args.json:
        print(json.dumps({"status": "ok", "artifact": str(args.artifact), "ok": True, "problems": []}, indent=2))
    print(f"{args.artifact}: all files match the manifest", file=sys.stderr)
    return EXIT_OK


def _cmd_generate(argv: list[str]) -> int:
    p = ArgumentParser(prog="convert.py generate", description="Greedy-generate from an artifact's INT8 "
                       "model with ONNX Runtime, streaming text to stdout.")
    p.add_argument("artifact", type=Path, help="an artifact folder: artifacts/<name>/<version>")
    p.add_argument("--prompt", required=True, help="text to continue (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the tokenizer's chat template (instruct models); "
                   "prints only the reply")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="default 32 (stops early at EOS)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="ONNX Runtime intra-op threads (default 0: one per physical core)")
    p.add_argument("--json", action="store_true", help="print one JSON record (tokens, text, timings) instead")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: expected a positive integer")
    if args.threads < 0:
        raise UserError(f"--threads {args.threads}: expected 0 (ONNX Runtime's default) or a positive count")
    from converter.artifact.generate import generate_record
    from converter.artifact.package import read_manifest

    kind = read_manifest(args.artifact).get("model", {}).get("kind")
    if kind != "decoder":
        raise UserError(f"{args.artifact} holds an {kind or 'unknown'} model: generate needs a decoder (a causal LM)")

    lead = ["" if args.chat else args.prompt]  # a continuation follows the prompt's text; a reply stands alone

    def echo(piece: str) -> None:  # the prompt goes out with the first token, once the artifact has loaded
        if not args.json:
            sys.stdout.write((lead.pop() if lead else "") + piece)
            sys.stdout.flush()

    record = generate_record(args.artifact, args.prompt, args.max_new_tokens, echo, chat=args.chat,
                             threads=args.threads)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        sys.stdout.write("\n")
        n = record["new_tokens"]
        rate = f", then {record['tokens_per_s']:.1f} tokens/s" if record["tokens_per_s"] else ""
        print(f"{n} token{'s' if n != 1 else ''} (prompt {len(record['prompt_tokens'])}); model loaded in "
              f"{record['load_s']:.2f} s, first token after {record['first_token_s']:.3f} s{rate}", file=sys.stderr)
    return EXIT_OK


def _cmd_triton(argv: list[str]) -> int:
    p = ArgumentParser(prog="convert.py triton", description="Assemble or update a Triton model "
                       "repository from published artifacts (nothing is rebuilt).")
    p.add_argument("artifacts", type=Path, nargs="+", metavar="ARTIFACT", help="artifacts/<name>/<version>")
    p.add_argument("--repo", type=Path, required=True, help="model repository folder (created if missing)")
    p.add_argument("--version", type=int, help="Triton version folder (default: the artifact's build number)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.version is not None and args.version < 1:
        raise UserError(f"--version {args.version}: Triton versions are positive integers")
    from converter.artifact.triton import assemble

    result = assemble(args.artifacts, args.repo, args.version)
    if args.json:
        print(json.dumps({"repository": str(args.repo), **result}, indent=2))
    for name, model in result["models"].items():
        print(f"{args.repo / name}: version {model['version']}, {model.get('platform') or model.get('backend')}, {', '.join(model['files'])}",
              file=sys.stderr)
    for where, why in result["skipped"].items():
        print(f"skipped {where}: {why}", file=sys.stderr)
    return EXIT_OK


def _cmd_serve(argv: list[str]) -> int:
    p = ArgumentParser(prog="convert.py serve", description="Serve a decoder artifact's generate model from a "
                       "real Triton server (the serving environment's tritonserver) until Ctrl-C.")
    p.add_argument("artifact", type=Path, help="an artifact folder: artifacts/<name>/<version>")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, metavar="N", help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, metavar="N", help="metrics port (default 8002)")
    args = p.parse_args(argv)
    for flag, port in (("--port", args.port), ("--grpc-port", args.grpc_port), ("--metrics-port", args.metrics_port)):
        if not 0 < port < 65536:
            raise UserError(f"{flag} {port}: expected a TCP port (1-65535)")
    import tempfile

    from converter.artifact import serve

    serve.serving_venv()  # a missing environment is one line before any work
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="convert-serve-") as tmp:
        repo, model = serve.artifact_repository(args.artifact, Path(tmp) / "repository")
        print(f"starting tritonserver on {repo} (model {model}; log {Path(tmp) / 'tritonserver.log'})", file=sys.stderr)
        server = serve.start(repo, [model], Path(tmp) / "tritonserver.log", host=args.host, http_port=args.port,
                             grpc_port=args.grpc_port, metrics_port=args.metrics_port)
        try:
            print(serve.usage(server, model))
            print(f"serving (pid {server.pid}); Ctrl-C stops it", file=sys.stderr, flush=True)
            code = server.process.wait()
            raise UserError(f"tritonserver exited on its own with code {code}:\n{server.log_tail()}")
        finally:
            print(f"stopping tritonserver (pid {server.pid})", file=sys.stderr)
            server.stop()


def _cmd_matrix(argv: list[str]) -> int:
    p = ArgumentParser(prog="convert.py matrix", description="CI job matrix: recipe x target.")
    p.add_argument("paths", type=Path, nargs="+", metavar="RECIPES", help="recipe folders or files")
    p.add_argument("--format", choices=("github", "json"), default="json")
    args = p.parse_args(argv)
    from converter.artifact.ci_matrix import job_matrix, render

    print(render(job_matrix(args.paths), args.format))
    return EXIT_OK


def exit_on_sigterm() -> None:
    """Turn SIGTERM (a cancelled CI job, `kill`) into SystemExit(143), so the staging folder and the
    work files are removed on the way out as they are for Ctrl-C. Python's default dies on the spot."""
    import signal

    def terminate(signum, frame):
        print("terminated: removing unfinished files", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, terminate)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from converter.cli.targets import cmd_targets

    commands = {"inspect": _cmd_inspect, "verify": _cmd_verify, "generate": _cmd_generate, "targets": cmd_targets,
                "triton": _cmd_triton, "serve": _cmd_serve,
                "matrix": _cmd_matrix}
    wants_json = "--json" in argv  # with --json, stdout always carries one JSON document, failures included
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return _cmd_convert(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if wants_json:
            print(json.dumps({"status": "error", "error": str(exc), **exc.details}, indent=2))
        return EXIT_USER
    except ParityFailure as exc:  # the convert command has printed its own JSON record
        print(f"parity failure: {exc}", file=sys.stderr)
        return EXIT_PARITY
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: show everything
        traceback.print_exc()
        if wants_json:
            print(json.dumps({"status": "internal_error", "error": f"{type(exc).__name__}: {exc}"}, indent=2))
        return EXIT_INTERNAL
