import json
import math
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from converter.models.text import Windows
from converter.parity.metrics import ComparatorCheck, ParityMetrics, check_thresholds, evaluate
from converter.recipe import Thresholds


class FixedRunner:
    """A runner with the Polygraphy interface that returns precomputed logits per call."""

    def __init__(self, logits: list[np.ndarray]):
        self.logits = logits
        self.calls = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def infer(self, feed):
        out = self.logits[self.calls]
        self.calls += 1
        assert out.shape[:2] == feed["input_ids"].shape
        return OrderedDict(logits=out)


def make(seed, n=4, t=16, v=50):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (n, t), generator=g)
    ref = torch.randn(n, t, v, generator=g) * 3
    return ids, ref


def test_identical_outputs_give_perfect_metrics():
    ids, ref = make(0)
    m = evaluate(FixedRunner([ref[:2].numpy(), ref[2:].numpy()]), FixedRunner([ref[:2].numpy(), ref[2:].numpy()]),
                 Windows(ids, "x", 4), batch_size=2)
    assert m.ppl_ratio == pytest.approx(1.0) and m.top1_agreement == 1.0
    assert m.min_cosine == pytest.approx(1.0) and m.kl_mean == pytest.approx(0.0, abs=1e-12)


def test_metrics_match_inline_formulas():
    ids, ref = make(1)
    cand = ref + torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    m = evaluate(FixedRunner([ref[:3].numpy(), ref[3:].numpy()]), FixedRunner([cand[:3].numpy(), cand[3:].numpy()]),
                 Windows(ids, "x", 4), batch_size=3)
    v = ref.shape[-1]
    ppl = lambda logits: math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, v).double(), ids[:, 1:].reshape(-1)))
    assert m.reference_ppl == pytest.approx(ppl(ref), rel=1e-9)
    assert m.candidate_ppl == pytest.approx(ppl(cand), rel=1e-9)
    assert m.ppl_ratio == pytest.approx(ppl(cand) / ppl(ref), rel=1e-9)
    cos = F.cosine_similarity(ref.double(), cand.double(), dim=-1)
    assert m.mean_cosine == pytest.approx(float(cos.mean())) and m.min_cosine == pytest.approx(float(cos.min()))
    assert m.top1_agreement == pytest.approx(float((ref.argmax(-1) == cand.argmax(-1)).double().mean()))
    kl = F.kl_div(F.log_softmax(cand.double(), -1), F.log_softmax(ref.double(), -1), log_target=True, reduction="sum")
    assert m.kl_mean == pytest.approx(float(kl) / ids.numel(), rel=1e-9)
    assert 0 < m.top1_agreement < 1 and m.kl_mean > 0


def _metrics(**kw):
    base = dict(windows=1, tokens=10, reference_ppl=10.0, candidate_ppl=10.5, ppl_ratio=1.05, mean_cosine=0.99,
                min_cosine=0.9, top1_agreement=0.95, kl_mean=0.02)
    return ParityMetrics(**{**base, **kw})


def test_thresholds_pass_and_fail_with_named_metric():
    t = Thresholds(max_ppl_ratio=1.1, min_mean_cosine=0.98, min_min_cosine=0.5, min_top1_agreement=0.9, max_kl=0.05)
    assert check_thresholds(_metrics(), [], t) == []
    failures = check_thresholds(_metrics(ppl_ratio=1.3, top1_agreement=0.5), [], t)
    assert len(failures) == 2 and failures[0].startswith("ppl_ratio 1.3") and "top1_agreement 0.5" in failures[1]


def test_null_threshold_is_reported_not_enforced():
    t = Thresholds(max_ppl_ratio=None, min_mean_cosine=None, min_min_cosine=None, min_top1_agreement=None, max_kl=None)
    assert check_thresholds(_metrics(ppl_ratio=50.0), [], t) == []


def test_failed_comparator_check_is_a_failure():
    check = ComparatorCheck("int8_vs_fp32_onnx", ("a", "b"), "mean", 0.5, False, 3.0, 0.9)
    assert check_thresholds(_metrics(), [check], Thresholds()) == [
        "polygraphy int8_vs_fp32_onnx mean |diff| 0.9 (required <= 0.5)"
    ]


# Activations clipped at their median: an artifact built to miss. On the tiny Llama it measured greedy token
# agreement 0.04 and a mean int8-vs-fp32 logit difference of 0.096 (a faithful conversion: 1.0 and 0.006).
CLIPPED = {"activations": {"range": "percentile", "percentile": 50.1}}
NO_THRESHOLDS = dict.fromkeys(("max_ppl_ratio", "min_mean_cosine", "min_min_cosine", "min_top1_agreement", "max_kl"))


@pytest.mark.parametrize("gate, parity, failure", [
    ("token_agreement", {"thresholds": {**NO_THRESHOLDS, "min_token_agreement": 0.5}},
     r"token_agreement 0\.0\d+ \(required >= 0\.5\)"),
    ("comparator", {"thresholds": NO_THRESHOLDS, "polygraphy": {"int8_atol": 0.05}},
     r"polygraphy int8_vs_fp32_onnx mean \|diff\| 0\.0\d+ \(required <= 0\.05\)"),
], ids=["token_agreement", "comparator"])
def test_a_gate_alone_fails_a_clipped_artifact_with_exit_2(gate, parity, failure, tiny_checkpoints, tmp_path):
    """Every other threshold is off, so the exit code and the one failure line are this gate's alone.
    `--no-cache`: a cached parity stage is re-judged from stored numbers (converter/stage_cache.py), and this
    test is about the comparison the pipeline itself runs (Polygraphy's verdict, the threshold rules)."""
    from conftest import tiny_recipe_dict
    from runcli import NAME, VERSION, run_cli

    data = tiny_recipe_dict(tiny_checkpoints["llama"])
    data["quantization"] = CLIPPED
    data["parity"].update(parity)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    code, _, stderr = run_cli(recipe, "--output-dir", tmp_path / "out", "--quiet", "--no-cache")
    assert code == 2, stderr
    report = json.loads((tmp_path / "out" / NAME / "_rejected" / VERSION / "parity_report.json").read_text())
    (target_report,) = report.values()
    assert len(target_report["failures"]) == 1 and re.fullmatch(failure, target_report["failures"][0]), report
    assert re.search(f"cpu-onnxruntime: {failure}", stderr.strip().splitlines()[-1]), stderr
    measured = (target_report["generation"]["token_agreement"] if gate == "token_agreement" else
                next(c["mean_absdiff"] for c in target_report["comparator"] if c["name"] == "int8_vs_fp32_onnx"))
    assert measured < 0.5 if gate == "token_agreement" else measured > 0.05


def test_a_streamed_reference_measures_what_the_whole_model_does(tmp_path):
    """The FP32 reference of a model not held whole (converter/targets/runners.py: StreamedRunner)
    gives `evaluate` the whole model's metrics to the last digit; a mixed-up batch is refused."""
    import copy

    from converter.models.archs import arch_spec
    from converter.models.lazy import StreamedModel
    from converter.targets.runners import StreamedRunner, TorchRunner
    from tiny_models import sharded_bf16

    _, whole = sharded_bf16("qwen2", tmp_path)
    candidate = copy.deepcopy(whole)
    with torch.no_grad():
        candidate.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    windows = Windows(torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(1)), "t", 5)
    expected = evaluate(TorchRunner(whole), TorchRunner(candidate), windows, batch_size=2)
    streamed = StreamedRunner(StreamedModel(tmp_path, arch_spec(whole)), windows, batch_size=2)
    got = evaluate(streamed, TorchRunner(candidate), windows, batch_size=2)
    assert got == expected and got.ppl_ratio != 1.0
    with streamed, pytest.raises(RuntimeError, match="none of the batches it computed"):
        streamed.infer({"input_ids": windows.input_ids[:2].flip(0).numpy(),
                        "attention_mask": np.ones((2, 24), dtype=np.int64)})
    smoothed = StreamedModel(tmp_path, arch_spec(whole))
    smoothed.prepare = lambda prefix, block: None
    with pytest.raises(RuntimeError, match="must read the checkpoint as stored"), StreamedRunner(smoothed, windows, 2):
        pass
