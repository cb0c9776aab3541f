"""Serving under load: the generate model on a real Triton server, 1, 4 and 16 concurrent clients,
the INT8 artifact against the FP32 export served the same way, in one run.

    .venv/bin/python bench/serve.py [--artifact DIR] [--recipe YAML] [--duration 120] [--soak 600]
                                    [--max-tokens 64] [--clients 1 4 16]

Without --artifact the shipped recipe is converted first (through the real CLI). The FP32 baseline
is the recipe's checkpoint exported with the artifact's KV-cache graph layout and attention, nothing
quantized (`converter.export.exporter.float_graph`), put in a generate model of its own with the artifact's
tokenizer. Each model gets its own tritonserver (`converter/artifact/serve.py`), started, loaded and stopped
in turn. Each client loops over the lines of recipes/data/clinical-questions.txt (continued as
text, as `convert.py generate` does without --chat), one gRPC streaming request at a time, for
`--duration` seconds per client count (`--soak` seconds for the largest count on INT8: the
10-minute no-failure target). Recorded per (model, clients): tokens/s over all clients, time to the
first token and the gap between tokens (p50, p99), failed requests (an error response or no answer)
and wrong ones (tokens that differ from the greedy tokens ONNX Runtime gives for the same prompt
outside the server, batch 1: `convert.py generate`'s), and the server's
RSS (tritonserver and its python stubs) sampled every 2 s. Writes bench/results/serve.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from cli_run import shipped_artifact, stamp, write_results

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-cpu.yaml"
PROMPTS = ROOT / "recipes" / "data" / "clinical-questions.txt"
TARGETS = {"batching_16_over_1": 4.0, "int8_over_fp32_at_16": 1.8, "failures": 0}


def fp32_repository(artifact: Path, recipe_path: Path, repo: Path, work: Path) -> str:
    """Write a generate model serving the FP32 export of the artifact's checkpoint; returns its name."""
    from decode import fused_attention
    from converter.artifact import triton
    from converter.artifact import triton_generate
    from converter.artifact.package import read_manifest
    from converter.export.exporter import float_graph
    from converter.models.load import load_reference
    from converter.recipe import Export, Triton, load_recipe

    recipe = load_recipe(recipe_path)
    model = load_reference(recipe.path(recipe.recipe.source.path), recipe.recipe.source)
    graph = float_graph(model, work / "fp32.onnx", Export(kv_cache=True, attention=fused_attention(artifact / "model.onnx")))
    del model
    manifest = read_manifest(artifact)
    files = {**triton_generate.files(artifact, manifest), "model.onnx": graph}
    files = {k: v for k, v in files.items() if not k.startswith("model.onnx.data")}
    name = "fp32-generate"
    triton.write_model(repo, triton.ModelSpec(name, triton.PYTHON, 1, [], [], files,
                                              settings=Triton.model_validate(manifest["recipe"].get("triton", {})),
                                              max_batch=triton_generate.MAX_BATCH))
    return name


def references(model_path: Path, tokenizer, prompts: list[str], max_tokens: int) -> dict[str, list[int]]:
    """prompt -> the greedy tokens ONNX Runtime gives outside the server (what `convert.py generate` prints)."""
    from converter.artifact.generate import prompt_ids
    from converter.export.kv_graph import graph_kv_layout
    from converter.parity.generation import greedy_graph, session_step
    from converter.targets.runners import onnxruntime_session

    step, layout = session_step(onnxruntime_session(model_path)), graph_kv_layout(model_path)
    return {p: list(greedy_graph(step, layout, prompt_ids(tokenizer, p, False), max_tokens, tokenizer.eos_token_id))
            for p in prompts}


class Client(threading.Thread):
    """Sends one streaming request after another until `stop` is set, recording what it sees."""

    def __init__(self, url: str, model: str, prompts: list[str], offset: int, max_tokens: int, expected: dict,
                 stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.model, self.prompts, self.offset = url, model, prompts, offset
        self.max_tokens, self.expected, self.stop = max_tokens, expected, stop
        self.ttft, self.gaps, self.tokens, self.requests, self.failures, self.wrong = [], [], 0, 0, [], []

    def one(self, client, prompt: str) -> None:
        import numpy as np
        import tritonclient.grpc as grpcclient

        got, times, errors, done = [], [], [], threading.Event()

        def callback(result, error):
            if error is not None:
                errors.append(str(error))
                done.set()
            elif result.as_numpy("token_ids") is not None:
                times.append(time.perf_counter())
                got.extend(result.as_numpy("token_ids").tolist())
            if error is None and result.get_response().parameters["triton_final_response"].bool_param:
                done.set()

        inputs = [grpcclient.InferInput("text_input", [1], "BYTES"), grpcclient.InferInput("max_tokens", [1], "INT32"),
                  grpcclient.InferInput("stream", [1], "BOOL")]
        for tensor, value in zip(inputs, (np.array([prompt.encode()], dtype=np.object_),
                                          np.array([self.max_tokens], dtype=np.int32), np.array([True]))):
            tensor.set_data_from_numpy(value)
        client.start_stream(callback=callback)
        start = time.perf_counter()
        client.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
        finished = done.wait(300)
        client.stop_stream()
        self.requests += 1
        if errors or not finished:
            self.failures.append({"prompt": prompt, "error": errors[0] if errors else "no final response in 300 s"})
            return
        if got != self.expected[prompt]:  # a wrong answer: counted apart, with where it went another way
            want = self.expected[prompt]
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            self.wrong.append({"prompt": prompt, "first_divergence": first, "tokens": got, "expected": want})
        self.tokens += len(got)
        self.ttft.append(times[0] - start)
        self.gaps += [b - a for a, b in zip(times, times[1:])]

    def run(self) -> None:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.url)
        i = self.offset
        while not self.stop.is_set():
            self.one(client, self.prompts[i % len(self.prompts)])
            i += 1
        client.close()


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the process group (tritonserver and its python stubs)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, ValueError):
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def load_level(server, model: str, clients: int, seconds: float, prompts, max_tokens, expected, rss: list) -> dict:
    """`clients` concurrent clients for `seconds`; RSS samples are appended to `rss` as (t, MB)."""
    stop = threading.Event()
    workers = [Client(server.grpc_url, model, prompts, i, max_tokens, expected, stop) for i in range(clients)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    while time.perf_counter() - start < seconds:
        time.sleep(2)
        rss.append((round(time.perf_counter() - start, 1), round(group_rss_mb(server.pid), 1)))
    stop.set()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    ttft, gaps = [t for w in workers for t in w.ttft], [g for w in workers for g in w.gaps]
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {"clients": clients, "seconds": round(wall, 1), "requests": sum(w.requests for w in workers),
            "tokens": sum(w.tokens for w in workers), "tokens_per_s": round(sum(w.tokens for w in workers) / wall, 2),
            "ttft_ms_p50": ms(percentile(ttft, 50)), "ttft_ms_p99": ms(percentile(ttft, 99)),
            "token_ms_p50": ms(percentile(gaps, 50)), "token_ms_p99": ms(percentile(gaps, 99)),
            "failures": [f for w in workers for f in w.failures][:20], "failed": sum(len(w.failures) for w in workers),
            "wrong_examples": [f for w in workers for f in w.wrong][:20], "wrong": sum(len(w.wrong) for w in workers)}


def rss_summary(samples: list[tuple[float, float]]) -> dict:
    """Start, end and peak MB, and the growth after warm-up (the first quarter of the samples)."""
    if not samples:
        return {}
    mb = [m for _, m in samples]
    warm = mb[len(mb) // 4:]
    return {"start_mb": mb[0], "end_mb": mb[-1], "peak_mb": max(mb), "after_warmup_growth_mb": round(warm[-1] - warm[0], 1),
            "samples": samples}


def serve_model(repo: Path, model: str, levels: list[int], durations: dict, args, prompts, expected, log: Path) -> dict:
    from converter.artifact import serve

    rows = {}
    with serve.start(repo, [model], log) as server:
        load_level(server, model, 1, min(10, durations[levels[0]]), prompts, args.max_tokens, expected, [])  # warm-up
        for clients in levels:
            samples: list = []
            rows[clients] = load_level(server, model, clients, durations[clients], prompts, args.max_tokens,
                                       expected, samples)
            rows[clients]["rss"] = rss_summary(samples)
            print(f"{model}, {clients} clients: {rows[clients]['tokens_per_s']} tokens/s, "
                  f"{rows[clients]['failed']} failed, {rows[clients]['wrong']} wrong", file=sys.stderr, flush=True)
    return rows


def table(results: dict, levels: list[int]) -> str:
    lines = [f"Serving on tritonserver 2.51 (python backend), {results['machine']}, {results['date']}"
             + (f" ({results['note']})" if results["note"] else ""), "",
             f"| model | clients | tokens/s | TTFT p50 / p99 (ms) | per token p50 / p99 (ms) | requests | failed | "
             "wrong | server RSS start -> end (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results["models"].items():
        for clients in levels:
            r = rows[clients]
            lines.append(f"| {name} | {clients} | {r['tokens_per_s']:.1f} | {r['ttft_ms_p50']} / {r['ttft_ms_p99']} | "
                         f"{r['token_ms_p50']} / {r['token_ms_p99']} | {r['requests']} | {r['failed']} | {r['wrong']} | "
                         f"{r['rss'].get('start_mb')} -> {r['rss'].get('end_mb')} |")
    t = results["targets"]
    lines += ["", f"{levels[-1]} clients over {levels[0]} (INT8): {t['batching_16_over_1']}x (target >= 4); INT8 over "
              f"FP32 at {levels[-1]} clients: {t['int8_over_fp32_at_16']}x (target >= 1.8); failed or wrong responses: "
              f"{t['failures']} (target 0); INT8 server RSS growth after warm-up at {levels[-1]} clients: "
              f"{t['rss_growth_mb']} MB"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="an artifact folder (default: convert the shipped recipe)")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe whose checkpoint the FP32 export takes")
    parser.add_argument("--duration", type=float, default=120, help="seconds per (model, client count)")
    parser.add_argument("--soak", type=float, default=600, help="seconds of the largest client count on INT8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from converter.artifact import serve

    levels = sorted(args.clients)
    prompts = [line for line in PROMPTS.read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        artifact = shipped_artifact(args.artifact, args.recipe, work)
        repo, int8_model = serve.artifact_repository(artifact, work / "repository")
        fp32_repo = work / "fp32-repository"
        fp32_model = fp32_repository(artifact, args.recipe, fp32_repo, work)
        tokenizer = AutoTokenizer.from_pretrained(str(artifact))
        expected = {"int8": references(artifact / "model.onnx", tokenizer, prompts, args.max_tokens),
                    "fp32": references(fp32_repo / fp32_model / "1" / "model.onnx", tokenizer, prompts, args.max_tokens)}
        durations = {c: args.duration for c in levels}
        models = {"int8": serve_model(repo, int8_model, levels, {**durations, levels[-1]: args.soak}, args, prompts,
                                      expected["int8"], work / "int8.log"),
                  "fp32": serve_model(fp32_repo, fp32_model, levels, durations, args, prompts, expected["fp32"],
                                      work / "fp32.log")}
    top = levels[-1]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    results = {**stamp(), "note": args.note, "artifact": str(artifact), "max_tokens": args.max_tokens,
               "prompts": len(prompts), "models": models,
               "targets": {"batching_16_over_1": ratio(models["int8"][top]["tokens_per_s"], models["int8"][levels[0]]["tokens_per_s"]),
                           "int8_over_fp32_at_16": ratio(models["int8"][top]["tokens_per_s"], models["fp32"][top]["tokens_per_s"]),
                           "failures": sum(r["failed"] + r["wrong"] for rows in models.values() for r in rows.values()),
                           "rss_growth_mb": models["int8"][top]["rss"].get("after_warmup_growth_mb"),
                           "goals": TARGETS}}
    text = table(results, levels)
    write_results("serve", results, text)
    print(text)


if __name__ == "__main__":
    main()
