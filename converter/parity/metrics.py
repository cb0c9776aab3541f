"""Stage *parity*: is the INT8 artifact faithful to the FP32 original?

Metrics stream window by window (a 256-token window of a 49k-vocabulary model is 50 MB of logits), so
memory does not grow with the evaluation set. Quantized models are judged with quantization-level
metrics (perplexity, cosine, top-1, KL), not elementwise tolerances: one int8 rounding flip on a real
model moves logits by ~0.1.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from converter.export.kv_graph import KvLayout, prefill_feed
from converter.models.text import Windows
from converter.progress import track

if TYPE_CHECKING:  # annotations only: the recipe sits above the stages
    from converter.recipe import PolygraphyCheck, Thresholds


@dataclass
class ParityMetrics:
    """Decoders: every field, cosines of the logits per position. Encoders (converter/models/io.py):
    cosines per window of `compared` (per unmasked token for a token-classification head), top-1 only for a
    classification head, no perplexity or KL (None)."""

    windows: int
    tokens: int
    reference_ppl: float | None
    candidate_ppl: float | None
    ppl_ratio: float | None
    mean_cosine: float
    min_cosine: float
    top1_agreement: float | None
    kl_mean: float | None
    compared: str = "logits"


@dataclass
class ComparatorCheck:
    """One Polygraphy `Comparator.compare_accuracy` run between two runners."""

    name: str
    runners: tuple[str, str]
    error_stat: str
    atol: float
    passed: bool
    max_absdiff: float
    mean_absdiff: float


MEMORIZED_PPL = 3.0  # FP32 perplexity below this: the model recites the text, so it cannot judge the artifact


@dataclass
class SetReport:
    """One evaluation set's measurements and verdict (its own report row)."""

    name: str
    metrics: ParityMetrics
    thresholds: dict
    generation: dict | None = None  # converter.parity.generation.GenerationMetrics.to_dict(), decoders only
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": not self.failures, "failures": self.failures, "warnings": self.warnings,
                "metrics": asdict(self.metrics), "thresholds": self.thresholds, "generation": self.generation}


@dataclass
class ParityReport:
    """Every evaluation set's row plus the Polygraphy comparator runs (on the first set's windows).

    `metrics`, `thresholds` and `generation` are the first set's, as in reports with one set; `failures`
    are every set's (named by their set when the recipe lists sets) and the comparator's."""

    sets: list[SetReport]
    comparator: list[ComparatorCheck]
    named: bool = False  # the recipe lists named sets: failure lines start with the set's name

    @property
    def metrics(self) -> ParityMetrics:
        return self.sets[0].metrics

    @property
    def thresholds(self) -> dict:
        return self.sets[0].thresholds

    @property
    def generation(self) -> dict | None:
        return self.sets[0].generation

    @property
    def failures(self) -> list[str]:
        lines = [f"{s.name}: {f}" if self.named else f for s in self.sets for f in s.failures]
        return lines + comparator_failures(self.comparator)

    @property
    def warnings(self) -> list[str]:
        return [w for s in self.sets for w in s.warnings]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "failures": self.failures,
            "warnings": self.warnings,
            "metrics": asdict(self.metrics),
            "thresholds": self.thresholds,
            "comparator": [asdict(c) for c in self.comparator],
            "generation": self.generation,
            "sets": [s.to_dict() for s in self.sets],
        }


def memorized_warning(name: str, metrics: ParityMetrics) -> list[str]:
    """One line when FP32's perplexity on set `name` is below MEMORIZED_PPL (a text the model recites
    moves little under quantization, so passing there says little), else none."""
    if metrics.reference_ppl is None or metrics.reference_ppl >= MEMORIZED_PPL:
        return []
    return [f"evaluation set {name}: FP32 perplexity {metrics.reference_ppl:.2f} (< {MEMORIZED_PPL:g}): the model "
            "has memorized this text, so it cannot judge the artifact; evaluate on text it has not seen"]


def judge(measured: list[tuple[str, ParityMetrics, dict | None]], checks: list[ComparatorCheck], parity) -> ParityReport:
    """Apply each set's thresholds (recipe `parity` section) to its measurements (name, metrics, generation)."""
    sets = []
    for cfg, (name, metrics, generation) in zip(parity.sets, measured, strict=True):
        assert cfg.name == name, (cfg.name, name)  # internal: measurements out of the recipe's order
        sets.append(SetReport(name, metrics, cfg.thresholds.model_dump(), generation,
                              check_thresholds(metrics, [], cfg.thresholds, generation),
                              memorized_warning(name, metrics)))
    return ParityReport(sets, checks, named=parity.named_sets)


class _Accumulator:
    def __init__(self):
        self.nll_ref = self.nll_cand = 0.0
        self.predicted = 0  # tokens with a next-token label
        self.positions = 0
        self.cos_sum = 0.0
        self.cos_min = math.inf
        self.top1 = 0
        self.kl_sum = 0.0

    def add(self, ids: torch.Tensor, ref: torch.Tensor, cand: torch.Tensor) -> None:
        ref, cand = ref.double(), cand.double()  # (B, T, V)
        lp_ref, lp_cand = F.log_softmax(ref, dim=-1), F.log_softmax(cand, dim=-1)
        labels = ids[:, 1:].unsqueeze(-1)
        self.nll_ref -= float(lp_ref[:, :-1].gather(-1, labels).sum())
        self.nll_cand -= float(lp_cand[:, :-1].gather(-1, labels).sum())
        self.predicted += labels.numel()
        cos = F.cosine_similarity(ref, cand, dim=-1)  # (B, T)
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min()))
        self.positions += cos.numel()
        self.top1 += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        self.kl_sum += float((lp_ref.exp() * (lp_ref - lp_cand)).sum())

    def metrics(self, windows: int) -> ParityMetrics:
        ref_ppl = math.exp(self.nll_ref / self.predicted)
        cand_ppl = math.exp(self.nll_cand / self.predicted)
        return ParityMetrics(
            windows=windows,
            tokens=self.positions,
            reference_ppl=ref_ppl,
            candidate_ppl=cand_ppl,
            ppl_ratio=cand_ppl / ref_ppl,
            mean_cosine=self.cos_sum / self.positions,
            min_cosine=self.cos_min,
            top1_agreement=self.top1 / self.positions,
            kl_mean=self.kl_sum / self.positions,
        )


def evaluate(reference, candidate, windows: Windows, batch_size: int, layout: KvLayout | None = None) -> ParityMetrics:
    """Run both runners on every evaluation window and accumulate the parity metrics.

    Args:
        reference, candidate: Polygraphy-style runners returning {"logits": (B, T, V)}.
        layout: the candidate graph's KV cache: every window is then a prefill with an empty past.
    """
    acc = _Accumulator()
    total = math.ceil(len(windows.input_ids) / batch_size)
    with reference, candidate:
        for ids, mask in track(windows.batches(batch_size), "evaluate", total=total):
            feed = prefill_feed(ids.numpy(), mask.numpy(), layout)
            ref = torch.from_numpy(np.asarray(reference.infer(feed)["logits"]))
            cand = torch.from_numpy(np.asarray(candidate.infer(feed)["logits"]))
            acc.add(ids, ref, cand)
    return acc.metrics(len(windows.input_ids))


def comparator_checks(torch_runner, fp32_runner, int8_runner, windows: Windows, cfg: PolygraphyCheck,
                      io=None, layout: KvLayout | None = None) -> list[ComparatorCheck]:
    """Polygraphy's comparator: PyTorch vs FP32 ONNX (export fidelity), FP32 vs INT8 ONNX.

    Args:
        io: the graph's inputs and output (`converter.models.io.ModelIO`); None: a decoder's.
        layout: a KV-cache graph's cache layout: every sample is then a prefill (empty past) and
            only `logits` are compared (the returned cache is the keys/values of the same prefill,
            checked through the logits of decode steps by generation parity).
    """
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc

    from converter.models.io import ModelIO

    io = io or ModelIO("decoder", ("input_ids", "attention_mask"), "logits")
    feeds = [{**io.feed(ids, mask), **(layout.empty_past(len(ids)) if layout is not None else {})}
             for ids, mask in windows.batches(1)][: cfg.samples]
    with _no_discarded_stats():
        results = Comparator.run([torch_runner, fp32_runner, int8_runner], data_loader=feeds)
    if layout is not None:  # keep only the logits of every run
        from polygraphy.comparator.struct import IterationResult

        for _, iterations in results:
            iterations[:] = [IterationResult({"logits": it["logits"]}, runtime=it.runtime, runner_name=it.runner_name)
                             for it in iterations]
    checks = []
    for name, pair, stat, atol in (
        ("export_fidelity", (0, 1), "max", cfg.export_atol),
        ("int8_vs_fp32_onnx", (1, 2), "mean", cfg.int8_atol),
    ):
        func = SimpleCompareFunc(atol=atol, rtol=0.0, check_error_stat=stat)
        with _no_discarded_stats():
            accuracy = Comparator.compare_accuracy(results, comparisons=[pair], compare_func=func)
        # AccuracyResults: one AccuracyResult per compare func: {(runner, runner): [{output: result}]}
        per_iteration = next(iter(accuracy[0].values()))
        outs = [it[io.output] for it in per_iteration]
        checks.append(
            ComparatorCheck(
                name=name,
                runners=(results[pair[0]][0], results[pair[1]][0]),
                error_stat=stat,
                atol=atol,
                passed=bool(accuracy),
                max_absdiff=max(float(o.max_absdiff) for o in outs),
                mean_absdiff=float(np.mean([float(o.mean_absdiff) for o in outs])),
            )
        )
    return checks


@contextmanager
def _no_discarded_stats():
    """Polygraphy formats every output's statistics (a median and quantiles: a sort of all its values,
    ~8 s for the comparator's logits of a 49k-vocabulary model) before its logger drops the line. While
    that logger is silenced (converter.targets.runners), skip the formatting; the comparison is unchanged."""
    from polygraphy.comparator import util as comp_util
    from polygraphy.logger import G_LOGGER

    if G_LOGGER.module_severity.get() <= G_LOGGER.INFO:
        yield
        return
    saved = comp_util.log_output_stats
    comp_util.log_output_stats = lambda *args, **kwargs: None
    try:
        yield
    finally:
        comp_util.log_output_stats = saved


def check_thresholds(metrics: ParityMetrics, checks: list[ComparatorCheck], t: Thresholds,
                     generation: dict | None = None) -> list[str]:
    """One line per missed threshold (empty when everything passes)."""
    failures = []
    gen_rules = (("token_agreement", generation["token_agreement"], t.min_token_agreement, ">="),
                 ("stepwise_agreement", generation.get("stepwise_agreement"), t.min_stepwise_agreement, ">="),
                 ) if generation else ()
    rules = (
        ("ppl_ratio", metrics.ppl_ratio, t.max_ppl_ratio, "<="),
        ("mean_cosine", metrics.mean_cosine, t.min_mean_cosine, ">="),
        ("min_cosine", metrics.min_cosine, t.min_min_cosine, ">="),
        ("top1_agreement", metrics.top1_agreement, t.min_top1_agreement, ">="),
        ("kl_mean", metrics.kl_mean, t.max_kl, "<="),
        *gen_rules,
    )
    for name, value, limit, op in rules:
        if limit is None or value is None:  # not enforced, or not measured for this model kind
            continue
        ok = value <= limit if op == "<=" else value >= limit
        if not ok:
            failures.append(f"{name} {value:.4g} (required {op} {limit:g})")
    return failures + comparator_failures(checks)


def comparator_failures(checks: list[ComparatorCheck]) -> list[str]:
    """One line per failed Polygraphy comparison."""
    return [f"polygraphy {c.name} {c.error_stat} |diff| "
            f"{c.max_absdiff if c.error_stat == 'max' else c.mean_absdiff:.4g} (required <= {c.atol:g})"
            for c in checks if not c.passed]
