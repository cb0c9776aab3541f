"""The texts a conversion is judged and tuned on: the evaluation sets of `parity.eval` and the
selection text of `selection`, and the parity stage that measures every set.

Evaluation sets are held out: nothing the conversion chooses (alpha search, sensitivity fallback) reads
them, and a selection text that is also an evaluation file is refused. Each set is measured on its own
windows and judged by its own thresholds; the Polygraphy comparator runs on the first set's windows.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from converter.errors import UserError
from converter.export import kv_graph
from converter.models.load import load_reference
from converter.models.text import Windows, shared_files, token_windows
from converter.parity.encoder import evaluate_encoder
from converter.parity.generation import generation_parity, generation_prompts, yardstick
from converter.parity.metrics import ParityReport, comparator_checks, evaluate, judge
from converter.progress import warn
from converter.targets.runners import TorchRunner, onnxruntime_runner

if TYPE_CHECKING:  # annotations only: the recipe sits above the stages
    from converter.recipe import LoadedRecipe


@dataclass
class EvalInputs:
    """Token windows of every evaluation set (recipe order), each set's generation prompts (empty: no
    generation parity on that set) and the selection windows (None: tuning reads the calibration windows)."""

    windows: list[Windows]
    prompts: list[list[list[int]]]
    selection: Windows | None

    @property
    def sha256(self) -> list[str]:
        return [w.sha256 for w in self.windows]


def set_label(recipe: LoadedRecipe, name: str) -> str:
    """How a recipe names a set's settings: `parity.eval` (one mapping) or `parity.eval[clinical]`."""
    return f"parity.eval[{name}]" if recipe.recipe.parity.named_sets else "parity.eval"


def load_eval_inputs(recipe: LoadedRecipe, tokenizer, wrap, decoder: bool) -> EvalInputs:
    """Cut every evaluation set and the selection text into windows, and the generation prompts.

    Prompts are cut from each set's windows; a `parity.generation.prompts_file` serves the first set only.

    Raises:
        UserError: a selection file has the bytes of an evaluation file (under any name), or a set's
            text is shorter than one window.
    """
    r = recipe.recipe
    windows, prompts = [], []
    for i, s in enumerate(r.parity.sets):
        windows.append(token_windows(recipe, s.text(), tokenizer, shuffle=False, wrap=wrap))
        shared = shared_files(recipe, r.calibration, s)
        if shared:
            warn(f"{set_label(recipe, s.name)}.files {', '.join(shared)} also calibrate the model (calibration.files): "
                 "parity is measured on calibration data and flatters the artifact; evaluate on held-out text")
        gen = r.parity.generation
        wanted = gen.enabled and decoder and (gen.prompts_file is None or i == 0)
        prompts.append(generation_prompts(windows[-1], gen, tokenizer, recipe.base_dir) if wanted else [])
    selection = None
    if r.selection is not None:
        for s in r.parity.sets:
            shared = shared_files(recipe, s, r.selection)
            if shared:
                raise UserError(f"selection.files {', '.join(shared)} has the text of evaluation set {s.name}: "
                                "choices tuned on it would flatter its parity gates; select on other text")
        selection = token_windows(recipe, r.selection, tokenizer, shuffle=True, wrap=wrap)
    return EvalInputs(windows, prompts, selection)


def measure_parity(recipe: LoadedRecipe, checkpoint: Path, io, inputs: EvalInputs, candidate,
                   fp32_path: Path, max_batch: int | None = None) -> ParityReport:
    """Every evaluation set's metrics and generation parity, the comparator runs, judged by the recipe.

    Args:
        max_batch: the most rows the candidate takes in one call (a TensorRT profile's batch maximum);
            None: any number.
    """
    r = recipe.recipe
    layout = kv_graph.graph_kv_layout(fp32_path)  # None: a graph without a cache (and every encoder)
    original = load_reference(checkpoint, r.source)  # once: metrics, the comparator and generation share it
    reference = TorchRunner(original, name="fp32-pytorch", io=io, layout=layout)
    metrics = [evaluate_encoder(reference, candidate, w, s.batch_size, io) if io.kind == "encoder"
               else evaluate(reference, candidate, w, s.batch_size, layout)
               for s, w in zip(r.parity.sets, inputs.windows)]
    checks = comparator_checks(reference, onnxruntime_runner(fp32_path, name="fp32-onnxruntime"), candidate,
                               inputs.windows[0], r.parity.polygraphy, io, layout)
    del reference
    generations = _generations(r.parity.generation, original, candidate, layout, inputs.prompts, max_batch)
    del original
    gc.collect()
    return judge([(s.name, m, g) for s, m, g in zip(r.parity.sets, metrics, generations)], checks, r.parity)


def _generations(cfg, original: torch.nn.Module, candidate, layout, prompts: list[list[list[int]]],
                 max_batch: int | None) -> list[dict | None]:
    """Generation parity on every set with prompts, then the BF16 yardstick on the same prompts.

    The yardstick casts `original` to bfloat16 in place: the FP32 reference is not needed after the
    candidate's measurements, and casting it (rather than a copy) holds no second model in memory.
    """
    results = [None] * len(prompts)
    with candidate:
        for i, set_prompts in enumerate(prompts):
            if set_prompts:
                results[i] = generation_parity(original, candidate.infer, layout, set_prompts, cfg.max_new_tokens,
                                               max_batch)
    if cfg.yardstick == "bf16" and any(m is not None for m in results):
        bf16 = original.to(torch.bfloat16)
        for m, set_prompts in zip(results, prompts):
            if m is not None:
                m.yardstick = yardstick(bf16, set_prompts, m.reference_tokens)
    return [m.to_dict() if m is not None else None for m in results]


def report_warnings(report: ParityReport, target: str) -> None:
    """Print each set's warnings (memorized text) on stderr, whether measured now or from the cache."""
    for line in report.warnings:
        warn(f"{target}: {line}")
