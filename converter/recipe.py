"""Recipe schema: one YAML file describes one conversion for one set of targets.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key is an error rather than a
silently ignored setting. Relative paths inside a recipe are resolved against the recipe's own folder,
so a recipe means the same thing whatever the current directory is.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from converter.errors import UserError, read_user_text
from converter.targets.engine_options import EngineOptions

SCHEMA_VERSION = 1
# Smoothing group names, written once (the architecture table's SmoothGroup names are these).
SmoothingGroup = Literal["attn_in", "mlp_in", "mlp_down", "attn_out", "head_in"]
SMOOTHING_GROUPS: tuple[str, ...] = get_args(SmoothingGroup)
# Activation range methods: each is implemented by an entry of quant/ranges.py RANGE_METHODS
# (tests/quant/test_ranges.py holds the two equal), so an unknown name is a recipe error.
RangeMethod = Literal["absmax", "percentile", "mse"]
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads a bare on/off/yes/no as a boolean, so
    `search: off` arrived as false; a boolean field still accepts those words (pydantic coerces them)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Section):
    """Where the HF checkpoint is and what loading it may do."""

    path: str = Field(description=(
        "Local HF folder: `config.json` + `*.safetensors` (sharded or not); every weight the model needs "
        "must be there with the shape `config.json` builds (transformers alone would fill a missing one "
        "at random); a LoRA fine-tune must be merged into its base first (a PEFT adapter folder is "
        "refused with the merge recipe)."))
    packaged: str | None = Field(default=None, description=(
        "A model shipped in a PyPI package (`smollm2-135m-instruct`), materialized into `path` when "
        "missing."))
    allow_pickle: bool = Field(default=False, description=(
        "Accept `pytorch_model*.bin` (pickle can run code)."))
    trust_remote_code: bool = Field(default=False, description=(
        "Run model code from the checkpoint folder."))


class TextData(_Section):
    """Text files (.txt, or .jsonl with one object per line) cut into token windows."""

    files: list[str] = Field(min_length=1, description=(
        "`.txt` files, or `.jsonl` with one object per line; relative paths resolve against the recipe's "
        "folder."))
    jsonl_field: str = Field(default="text", description=(
        "Field read from each JSONL object."))
    seq_len: int = Field(default=256, ge=8, le=32768, description=(
        "Tokens per window. A window is framed as the model meets text in use: a decoder whose tokenizer "
        "starts every text with a BOS (Gemma, Llama 3, Mistral) gets the BOS and `seq_len - 1` text "
        "tokens (those models put their largest activations on it); an encoder gets `[CLS]` ... `[SEP]`; "
        "other tokenizers (GPT-2, Qwen, SmolLM2) plain text tokens. The same holds for evaluation windows "
        "and the generation prompts cut from them."))
    num_samples: int = Field(default=64, ge=1, description=(
        "Windows used (at most): a seeded random pick for calibration, the first ones in order for "
        "evaluation."))
    batch_size: int = Field(default=4, ge=1, description=(
        "Windows per batch."))
    seed: int = Field(default=0, description=(
        "Seed of the random pick of windows."))


class Calibration(TextData):
    """Calibration text, plus decode steps for KV-cache graphs (used only with `export.kv_cache`)."""

    decode_windows: int = Field(default=8, ge=0, description=(
        "With `export.kv_cache`: windows also run as a prefill of their first `seq_len - decode_steps` "
        "tokens followed by `decode_steps` greedy one-token steps through the cache; the activation "
        "ranges (abs-max, histograms) cover those steps too. In float a token's activations are the same "
        "in a prefill and a decode step; what the steps add is the model's own greedy tokens, which "
        "corpus text never shows. The manifest records `calibration.decode_windows` / `decode_steps` / "
        "`decode_tokens`."))
    decode_steps: int = Field(default=32, ge=0, description=(
        "One-token decode steps per such window (smaller than `seq_len`)."))

    @model_validator(mode="after")
    def _steps_fit_the_window(self) -> "Calibration":
        if self.decode_steps >= self.seq_len:
            raise ValueError(f"decode_steps {self.decode_steps} must be smaller than seq_len {self.seq_len} "
                             "(each decode window is a prefix prefill plus the steps)")
        return self


class Smoothing(_Section):
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), folded into the preceding layer."""

    enabled: bool = Field(default=True, description=(
        "SmoothQuant on/off."))
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description=(
        "Migration strength (0.4-0.6 suits OPT/BLOOM, 0.75+ harder models; see the [SmolLM2 "
        "sweep](../bench/README.md#smollm2-smoothing-sweep-prefill-latency-conversion-cost))."))
    groups: list[SmoothingGroup] = Field(default_factory=lambda: list(SMOOTHING_GROUPS), description=(
        "`attn_in` norm->q/k/v, `mlp_in` norm->gate/up, `mlp_down` up->down, `attn_out` v->o, `head_in` "
        "final norm->lm_head (unties a tied lm_head so the embedding stays exact); a group whose linears "
        "stay float is skipped."))
    group_alpha: dict[SmoothingGroup, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=dict, description=(
            "Alpha of a group by name, over `alpha` (e.g. `{mlp_down: 0.9}`: down_proj's input, the product "
            "of two projections, has outliers of its own); a `per_group` or `per_block` search chooses "
            "every group's alpha itself and is refused with it."))
    search: Literal["off", "global", "per_group", "per_block"] = Field(default="off", description=(
        "`off`: `alpha` everywhere; `global`: the grid alpha whose fake-quant model has the least KL to "
        "float (the SmoothQuant paper's search); `per_group`: each group's grid alpha with the least W8A8 "
        "output error of its linears (the clinical recipe's setting); `per_block`: each block's grid alpha "
        "with the least W8A8 error of the whole block's output, weights and activations fake-quantized "
        "together (`bench/methods.py` measures it beside the others); chosen alpha and errors go into the "
        "manifest."))
    alpha_grid: list[float] = Field(
        default_factory=lambda: [round(0.3 + 0.05 * i, 2) for i in range(14)], min_length=1,
        description="The alphas the search tries.")
    search_samples: int = Field(default=4, ge=1, description=(
        "Calibration (or selection) windows the search scores."))

    @model_validator(mode="after")
    def _group_alpha_or_a_local_search(self) -> "Smoothing":
        if self.group_alpha and self.search in ("per_group", "per_block"):
            raise ValueError(f"group_alpha sets {', '.join(self.group_alpha)}, and search: {self.search} chooses "
                             "every group's alpha: use one of the two")
        return self

    @field_validator("alpha_grid")
    @classmethod
    def _grid_in_range(cls, grid: list[float]) -> list[float]:
        bad = [a for a in grid if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"alphas must be in [0, 1], got {bad}")
        return grid


class WeightQuant(_Section):
    dtype: Literal["int8"] = "int8"
    symmetric: Literal[True] = True
    granularity: Literal["per_channel"] = "per_channel"


class ActivationQuant(_Section):
    """Activation quantization: the SmoothQuant paper's levels are

    O3: `mode: static, granularity: per_tensor` (default): one calibrated scale per tensor, baked
        into the graph; the only level TensorRT and MIGraphX targets accept.
    O2: `mode: dynamic, granularity: per_tensor`: ONNX DynamicQuantizeLinear (uint8, asymmetric, one
        scale per tensor computed at run time); CPU target only.
    O1: `mode: dynamic, granularity: per_token`: a symmetric int8 scale per token computed at run
        time; CPU target only.
    """

    dtype: Literal["int8"] = Field(default="int8", description=(
        "int8: the only supported activation type."))
    symmetric: Literal[True] = Field(default=True, description=(
        "Static and per-token levels are symmetric; O2 follows ONNX `DynamicQuantizeLinear`, which is "
        "asymmetric uint8."))
    granularity: Literal["per_tensor", "per_token"] = Field(default="per_tensor", description=(
        "With `mode`, the SmoothQuant level: `static`+`per_tensor` is **O3** (calibrated scales baked "
        "into Q/DQ nodes; the only level GPU targets accept); `dynamic`+`per_tensor` is **O2** (ONNX "
        "`DynamicQuantizeLinear` -> `MatMulInteger`; ORT runs `DynamicQuantizeMatMul`); "
        "`dynamic`+`per_token` is **O1** (a symmetric int8 scale per token computed in the graph -> "
        "`MatMulInteger`)."))
    mode: Literal["static", "dynamic"] = Field(default="static", description=(
        "`static` or `dynamic` (see `granularity`). O1/O2 are for targets that run ONNX Runtime's graph "
        "(`cpu-onnxruntime`) only: a recipe that pairs them with a GPU target is refused."))
    range: RangeMethod = Field(default="absmax", description=(
        "Static range: `absmax` (never clip), `percentile` (clip at that percentile of \\|x\\|), or `mse` "
        "(the clip with the least expected int8 error, from a 2048-bin histogram of \\|x\\|)."))
    percentile: float = Field(default=99.99, gt=50.0, le=100.0, description=(
        "For `percentile`."))
    range_overrides: dict[str, RangeMethod] = Field(default_factory=dict, description=(
        "Per-linear method by name or fnmatch pattern, e.g. `{\"*.down_proj\": mse}`; a pattern that "
        "matches no linear is an error."))

    @model_validator(mode="after")
    def _per_token_is_dynamic(self) -> ActivationQuant:
        if self.granularity == "per_token" and self.mode == "static":
            raise ValueError("per_token granularity needs mode: dynamic (O1); static scales are per_tensor (O3)")
        return self

    @property
    def level(self) -> Literal["O1", "O2", "O3"]:
        """The SmoothQuant paper's name for this granularity."""
        if self.mode == "static":
            return "O3"
        return "O1" if self.granularity == "per_token" else "O2"


class Fallback(_Section):
    """Sensitivity analysis: keep the most sensitive linears in float until a target is met."""

    enabled: bool = Field(default=False, description=(
        "Sensitivity analysis: each linear alone back in float, scored by KL to float on calibration "
        "windows; the most sensitive stay float until the target is met."))
    target_kl: float | None = Field(default=0.02, ge=0, description=(
        "Target: mean KL(float \\|\\| int8) per token."))
    target_ppl_ratio: float | None = Field(default=None, gt=0, description=(
        "Target: INT8 / float perplexity on the scored windows."))
    max_float_mac_share: float = Field(default=0.10, ge=0, le=1, description=(
        "Budget: share of the quantized linears' MACs that may stay float. The summary table, `--json` "
        "(`fallback`: the float linears, their MAC share, `target_met`, the final scores) and the "
        "manifest say what it did; a target not met within the budget is a warning (the parity thresholds "
        "decide publishing)."))
    samples: int = Field(default=4, ge=1, description=(
        "Windows scored per candidate."))
    candidates: int | None = Field(default=48, ge=1, description=(
        "Linears scored end to end (one model pass each): those with the largest W8A8 output error of "
        "their own, measured in one pass; `null` scores all."))
    rank: Literal["sensitivity", "sensitivity_per_mac"] = Field(default="sensitivity", description=(
        "Order in which scored linears fall back: by KL drop, or `sensitivity_per_mac` (KL drop per MAC: "
        "several small projections for the MACs of one MLP linear). On the clinical recipe with a global "
        "alpha 0.8 it measured the same as `sensitivity` within the rounding spread (in-domain median "
        "x1.017 against x1.016), so no shipped recipe sets it."))


class Quantization(_Section):
    weights: WeightQuant = Field(default=WeightQuant(), description=(
        "int8, symmetric, per output channel: the only supported setting today."))
    activations: ActivationQuant = ActivationQuant()
    exclude: list[str] = Field(default_factory=lambda: ["lm_head"], description=(
        "Linears kept in float: names or fnmatch patterns (`\"*.down_proj\"`); a pattern the recipe writes "
        "that matches no linear is an error (a typo would quantize what it meant to keep)."))
    fallback: Fallback = Fallback()
    embedding: Literal["float", "int8"] = Field(default="float", description=(
        "`int8`: the token embedding table stored int8 with one scale per row; ONNX Runtime targets read "
        "it as Gather(int8) -> Cast -> Mul(Gather(row scales)), GPU targets as DequantizeLinear -> Gather "
        "(TensorRT takes an int8 constant only as a DQ input); a recipe mixing both kinds of target is "
        "refused. The manifest records it under `model.embedding`; see the [embedding "
        "benchmark](../bench/README.md#embedding-table-in-int8)."))


class DynamicAxes(_Section):
    batch: bool = Field(default=True, description=(
        "Dynamic batch dimension of the inputs."))
    sequence: bool = Field(default=True, description=(
        "Dynamic sequence dimension of the inputs."))


class Export(_Section):
    opset: int = Field(default=18, ge=13, le=21, description=(
        "ONNX opset (13-21). The exporter writes 18 and converts with ONNX's version converter: up to 21 "
        "works for every table family; down, GPT-2, OPT, BLOOM and BERT convert to 17, the RMSNorm "
        "families (Llama, Qwen, Gemma 3, Phi-3) do not, and nothing converts to 15 or below. A failed "
        "conversion is refused in one line."))
    dynamic_axes: DynamicAxes = DynamicAxes()
    external_data: Literal["auto", "always", "never"] = Field(default="auto", description=(
        "External weights file: `auto` (over 2 GB), `always`, `never`."))
    kv_cache: bool = Field(default=False, description=(
        "Decoders: export the [KV-cache graph](cli.md#kv-cache-graph) (it also takes "
        "`past_key_values.{i}.key/value` and returns `present.{i}.key/value`, so one graph serves prefill "
        "and one-token decode steps); the shipped recipe sets it."))
    attention: Literal["onnx", "onnxruntime"] = Field(default="onnx", description=(
        "`onnx`: attention in standard ONNX operators, for every target. `onnxruntime`: each block's "
        "attention as ONNX Runtime's `GroupQueryAttention` kernel (see [Fused "
        "attention](cli.md#fused-attention)); needs `export.kv_cache` and only ONNX Runtime targets "
        "(either missing is a one-line recipe error). The shipped recipe sets it."))


class Thresholds(_Section):
    """Parity gates; a threshold set to null is reported but not enforced."""

    max_ppl_ratio: float | None = Field(default=1.10, gt=0, description=(
        "INT8 / FP32 perplexity. Any threshold may be `null`: reported, not enforced."))
    min_mean_cosine: float | None = Field(default=0.95, ge=-1, le=1, description=(
        "Logits cosine per position, mean over positions."))
    min_min_cosine: float | None = Field(default=0.30, ge=-1, le=1, description=(
        "Logits cosine per position, worst position."))
    min_top1_agreement: float | None = Field(default=0.80, ge=0, le=1, description=(
        "Share of positions with the same argmax token."))
    max_kl: float | None = Field(default=0.15, ge=0, description=(
        "Mean KL(FP32 \\|\\| INT8) per token."))
    min_token_agreement: float | None = Field(default=None, ge=0, le=1, description=(
        "Greedy generation: INT8 vs FP32 token agreement (reported; enforced when set). Shipped recipe: "
        "reported only, see the [generation benchmark](../bench/README.md#generation-agreement)."))
    min_stepwise_agreement: float | None = Field(default=None, ge=0, le=1, description=(
        "Stepwise agreement (each step fed FP32's own tokens before it; one prefill per prompt), gated "
        "when set."))


class PolygraphyCheck(_Section):
    """Polygraphy comparator runs: PyTorch vs FP32 ONNX (export fidelity), FP32 vs INT8 ONNX."""

    samples: int = Field(default=2, ge=1, description=(
        "Windows run through Polygraphy's comparator."))
    export_atol: float = Field(default=1e-3, gt=0, description=(
        "Max \\|PyTorch - FP32 ONNX\\| logit (export fidelity)."))
    int8_atol: float = Field(default=1.5, gt=0, description=(
        "Mean \\|FP32 ONNX - INT8 ONNX\\| logit."))


class Generation(_Section):
    """Generation parity: greedy tokens of the FP32 original (PyTorch) vs the INT8 artifact."""

    enabled: bool = Field(default=True, description=(
        "Decoders: greedy-generate with the FP32 original (PyTorch, its own KV cache) and the INT8 "
        "artifact (the target's runner; prefill then decode steps with a KV-cache graph)."))
    prompts: int = Field(default=8, ge=1, description=(
        "Prompts: the first evaluation windows (or the first lines of `prompts_file`)."))
    prompt_tokens: int = Field(default=32, ge=1, description=(
        "Tokens of each evaluation window used as prompt (a value the recipe sets may not exceed the "
        "evaluation `seq_len`)."))
    prompts_file: str | None = Field(default=None, description=(
        "A text file, one prompt per line, instead of evaluation windows."))
    chat_template: bool = Field(default=False, description=(
        "Wrap each `prompts_file` line as a user message in the tokenizer's chat template "
        "(instruction-tuned checkpoints); a tokenizer without one is a one-line error."))
    max_new_tokens: int = Field(default=32, ge=1, description=(
        "Greedy tokens generated per prompt, EOS ignored."))
    yardstick: Literal["bf16"] | None = Field(default="bf16", description=(
        "Decoders: the checkpoint cast to bfloat16 in PyTorch, with its greedy and stepwise agreement "
        "with FP32 on the same prompts, reported beside the artifact's (not gated): how much an accepted "
        "16-bit format loses on the same prompts. `none` turns it off."))

    @field_validator("yardstick", mode="before")
    @classmethod
    def _none_is_off(cls, value):
        return None if isinstance(value, str) and value.lower() == "none" else value


class EvalSet(TextData):
    """One named evaluation text with its own thresholds and its own report row (the list form of
    `parity.eval`). Thresholds it does not set are `parity.thresholds`' values."""

    name: str = Field(pattern=_NAME_PATTERN, description="The set's name in reports and failure lines.")
    thresholds: Thresholds = Field(default_factory=Thresholds,
                                   description="Gates of this set: `parity.thresholds` overridden key by key.")

    def text(self) -> TextData:
        """The set as plain text settings: what its windows (and their digest) depend on, not its gates."""
        return TextData(**self.model_dump(include=set(TextData.model_fields)))


class Parity(_Section):
    eval: TextData | list[EvalSet] = Field(description=(
        "Held-out text: one mapping with the same fields as `calibration` (one set, named `eval`), or a "
        "list of named sets (`name`, the same fields, and optional `thresholds` that override "
        "`parity.thresholds` key by key). Each set gets its own row in `parity_report.{json,md}`, the "
        "manifest (`targets.*.parity.sets`, `evaluation.sets`), the summary table and `inspect`; a missed "
        "gate exits 2 and names its set. The first `num_samples` windows in order; a file that is also a "
        "calibration file (same bytes, any name) gets a warning: parity on calibration data flatters the "
        "artifact. When FP32 perplexity on a set is below 3 the run warns in one line that the model has "
        "memorized that text and the set cannot judge the artifact. Polygraphy's comparator runs on the "
        "first set's windows."))
    thresholds: Thresholds = Thresholds()
    polygraphy: PolygraphyCheck = PolygraphyCheck()
    generation: Generation = Generation()

    @model_validator(mode="before")
    @classmethod
    def _set_thresholds_inherit(cls, raw):
        """Resolve each listed set's thresholds once, here, so the resolved recipe carries them in full."""
        if not isinstance(raw, dict) or not isinstance(raw.get("eval"), list):
            return raw
        base = raw.get("thresholds") or {}
        base = base.model_dump() if isinstance(base, BaseModel) else base
        if not isinstance(base, dict):
            return raw  # the field's own validation reports it
        sets = [{**item, "thresholds": {**base, **(item.get("thresholds") or {})}}
                if isinstance(item, dict) and isinstance(item.get("thresholds") or {}, dict) else item
                for item in raw["eval"]]
        return {**raw, "eval": sets}

    @property
    def named_sets(self) -> bool:
        """True for the list form: failure lines then name their set."""
        return isinstance(self.eval, list)

    @property
    def sets(self) -> list[EvalSet]:
        """Every evaluation set; the single-mapping form is one set named `eval` with `thresholds`."""
        if isinstance(self.eval, list):
            return list(self.eval)
        return [EvalSet(name="eval", thresholds=self.thresholds, **self.eval.model_dump())]

    @field_validator("eval")
    @classmethod
    def _sets_named_once(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("list at least one evaluation set")
            names = [s.name for s in value]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"evaluation set name(s) {twice} used more than once")
        return value

    @model_validator(mode="after")
    def _prompts_fit_the_windows(self) -> "Parity":
        g = self.generation  # only a value the recipe sets: the default also serves encoders and short windows
        if "prompt_tokens" not in g.model_fields_set or g.prompts_file is not None:
            return self
        for s in self.sets:
            where = f"eval[{s.name}].seq_len" if self.named_sets else "eval.seq_len"
            if g.prompt_tokens > s.seq_len:
                raise ValueError(f"generation.prompt_tokens {g.prompt_tokens} is more than {where} {s.seq_len}: "
                                 "prompts are cut from the evaluation windows")
        return self


class DynamicBatching(_Section):
    enabled: bool = Field(default=True, description=(
        "Triton's dynamic batcher (only with `max_batch_size` > 0)."))
    max_queue_delay_microseconds: int = Field(default=100, ge=0, description=(
        "How long the batcher waits to fill a batch."))
    preferred_batch_size: list[int] = Field(default_factory=list, description=(
        "Batch sizes the batcher aims for; empty: Triton picks."))


class Triton(_Section):
    """Triton model repository written into every artifact (`triton/`); see converter/artifact/triton.py."""

    enabled: bool = Field(default=True, description=(
        "Write a Triton model repository into the artifact (`triton/`)."))
    model_name: str | None = Field(default=None, pattern=_NAME_PATTERN, description=(
        "Prefix of the Triton model names (`null`: `output.name`)."))
    max_batch_size: int = Field(default=8, ge=0, description=(
        "Used when the graph's batch axis is dynamic, else 0."))
    dynamic_batching: DynamicBatching = DynamicBatching()
    instance_count: int = Field(default=1, ge=1, description=(
        "Model instances per device."))
    intra_op_thread_count: int = Field(default=0, ge=0, description=(
        "ONNX Runtime models: threads per instance inside one operator (the backend's "
        "`intra_op_thread_count` parameter); 0 leaves ONNX Runtime's default, one per physical core, "
        "which oversubscribes the cores when `instance_count` > 1."))


class FusedRowsSpec(_Section):
    """Rows of a fused linear that produce a group's activation (see converter/models/archs.py FusedRows)."""

    parts: list[Literal["q", "kv", "ffn"]] = Field(min_length=1)
    take: int = Field(ge=0)
    per_head: bool = False

    @field_validator("take")
    @classmethod
    def _take_in_parts(cls, take: int, info) -> int:
        parts = info.data.get("parts") or []
        if parts and take >= len(parts):
            raise ValueError(f"take {take} is not an index of parts {parts}")
        return take


class GroupSpec(_Section):
    """One smoothing group: `prev`'s output channels divided by s, `balance` input columns times s."""

    name: SmoothingGroup
    prev: str
    prev_kind: Literal["norm", "linear", "linear_heads"]
    balance: list[str] = Field(min_length=1)
    prev_rows: FusedRowsSpec | None = None


class Architecture(_Section):
    """The layer map of a model class that is not in the built-in table (converter/models/archs.py).

    Paths of `linears` and `groups` are relative to one block; `lm_head` and `head_group` to the model.
    List only function-preserving groups: the producer's output must reach nothing but the balance
    linears, through nothing that a positive per-channel scale does not commute with.
    """

    blocks: str
    linears: list[str] = Field(min_length=1)
    groups: list[GroupSpec] = Field(default_factory=list)
    lm_head: str = Field(default="lm_head", description="Empty when the model has no output projection.")
    head_group: GroupSpec | None = None
    norm_offset: float = Field(default=0.0, description="1.0 for norms computing x_hat * (1 + weight).")
    kind: Literal["decoder", "encoder"] = "decoder"
    output: str = Field(default="logits", description="Model output the export returns.")
    grouped_attention: bool = Field(
        default=True, description="Export GQA attention without repeating the cache per query head.")


class Output(_Section):
    name: str = Field(pattern=_NAME_PATTERN, description=(
        "Artifact folder `artifacts/<name>/<version>/`."))
    version: str = Field(pattern=_NAME_PATTERN, description=(
        "The artifact's version (a bare integer version, `version: 2`, is read as \"2\")."))

    @field_validator("version", mode="before")
    @classmethod
    def _integer_version(cls, value):
        # YAML reads `version: 2` (and `--set output.version=2`, a CI build number) as an integer
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Recipe(_Section):
    schema_version: Literal[1] = Field(description=(
        "`1`: the schema this recipe is written against."))
    source: Source
    calibration: Calibration
    smoothing: Smoothing = Smoothing()
    quantization: Quantization = Quantization()
    export: Export = Export()
    targets: list[str] = Field(default_factory=lambda: ["cpu-onnxruntime"], min_length=1, description=(
        "Deployment targets (see [targets.md](targets.md))."))
    engine: EngineOptions = EngineOptions()  # GPU targets: profiles, workspace, compatibility
    selection: TextData | None = Field(default=None, description=(
        "Text the alpha search (`smoothing.search`), the sensitivity fallback and a recipe's fixed "
        "choices are judged on (same fields as `calibration`); absent, they score calibration windows. It "
        "may never be an evaluation text: refused by path in the recipe and by content at load, so the "
        "parity gates stay held out. `bench/selection.py` re-checks a fixed alpha on it."))
    parity: Parity
    triton: Triton = Triton()
    output: Output
    architecture: Architecture | None = Field(default=None, description=(
        "Layer map for a model class that is not in the built-in table (see [A class the table "
        "lacks](models.md#a-class-the-table-lacks-architecture))."))

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: list[str]) -> list[str]:
        from converter.targets.registry import TARGETS  # late import: the targets import torch

        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; known: {sorted(TARGETS)}")
        return targets

    @model_validator(mode="after")
    def _dynamic_on_cpu_only(self) -> Recipe:
        from converter.targets.registry import TARGETS

        level = self.quantization.activations.level
        gpu = [t for t in self.targets if not TARGETS[t].ort_graph]
        if level != "O3" and gpu:
            raise ValueError(
                f"dynamic activation quantization ({level}) exports ONNX dynamic-quantization ops that only the "
                f"cpu-onnxruntime target runs; {', '.join(gpu)} need static per-tensor scales "
                "(quantization.activations: {mode: static, granularity: per_tensor}, O3)"
            )
        return self

    @model_validator(mode="after")
    def _int8_embedding_one_layout(self) -> Recipe:
        from converter.targets.registry import TARGETS

        backends = {TARGETS[t].ort_graph for t in self.targets}
        if self.quantization.embedding == "int8" and len(backends) > 1:
            raise ValueError("quantization.embedding int8 is laid out per backend (ONNX Runtime: int8 rows "
                             "gathered, then scaled; TensorRT/MIGraphX: a DequantizeLinear on the table before the "
                             "Gather); convert the ONNX Runtime and the GPU targets with separate recipes")
        return self

    @property
    def embedding_layout(self) -> Literal["gather_rows", "dequantize_table"] | None:
        """How the graph reads an int8 embedding table (None: the table is float). ONNX Runtime gathers
        int8 rows and scales them (it would dequantize the whole table on every run if a
        DequantizeLinear came first); TensorRT takes an int8 constant only as a DequantizeLinear input."""
        from converter.targets.registry import TARGETS

        if self.quantization.embedding != "int8":
            return None
        return "gather_rows" if all(TARGETS[t].ort_graph for t in self.targets) else "dequantize_table"

    @model_validator(mode="after")
    def _selection_is_not_evaluation(self) -> Recipe:
        if self.selection is None:
            return self
        chosen = {os.path.normpath(f) for f in self.selection.files}
        for s in self.parity.sets:
            both = sorted(chosen & {os.path.normpath(f) for f in s.files})
            if both:
                raise ValueError(f"selection.files {', '.join(both)} also in evaluation set {s.name}: choices tuned "
                                 "on it would flatter its parity gates; select on other text")
        return self

    @model_validator(mode="after")
    def _ort_attention_on_ort_only(self) -> Recipe:
        from converter.targets.registry import TARGETS

        if self.export.attention != "onnxruntime":
            return self
        other = [t for t in self.targets if not TARGETS[t].ort_graph]
        if other:
            raise ValueError(f"export.attention onnxruntime writes ONNX Runtime's GroupQueryAttention, which "
                             f"{', '.join(other)} cannot run; use export.attention: onnx for those targets")
        if not self.export.kv_cache:
            raise ValueError("export.attention onnxruntime fuses the KV-cache graph's attention: "
                             "it needs export.kv_cache: true")
        return self


    @model_validator(mode="after")
    def _no_kv_cache_on_fixed_shapes(self) -> Recipe:
        from converter.targets.registry import TARGETS

        fixed = [t for t in self.targets if TARGETS[t].fixed_shape]
        if fixed and self.export.kv_cache:
            raise ValueError(f"{', '.join(fixed)}: {TARGETS[fixed[0]].fixed_shape} and a KV-cache graph's past grows "
                             "every decode step; use export.kv_cache: false for such targets")
        return self


class LoadedRecipe(BaseModel):
    """A validated recipe plus the folder its relative paths are resolved against."""

    model_config = ConfigDict(frozen=True)
    recipe: Recipe
    base_dir: Path
    source_file: Path

    def path(self, value: str) -> Path:
        """Resolve a path written in the recipe (relative to the recipe's folder)."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def resolved_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (defaults filled in), as written into every artifact."""
        return self.recipe.model_dump(mode="json")

    def digest(self) -> str:
        text = json.dumps(self.resolved_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set a.b.c=value` overrides to a raw recipe dict (values are parsed as YAML). A number
    indexes a list the recipe already has: `parity.eval.1.thresholds.max_kl=0.2`.

    Raises:
        UserError: an override is not of the form key=value, walks through a non-mapping, or indexes
            past the end of a list.
    """
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. smoothing.alpha=0.8")
        parts = key.strip().split(".")
        node = out
        for i, part in enumerate(parts):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {key}: {where}: {'.'.join(parts[:i])} is a list of {len(node)}; "
                                    f"index it with 0..{len(node) - 1}")
                part = int(part)
            elif not isinstance(node, dict):
                raise UserError(f"--set {key}: {'.'.join(parts[:i])} is not a section")
            if i == len(parts) - 1:
                node[part] = yaml.load(text, Loader=_YamlLoader) if text.strip() else None
            else:
                if isinstance(node, dict):
                    node.setdefault(part, {})
                node = node[part]
    return out


def _format_validation_error(source: Path, err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        problems.append(f"{where}: {msg}")
    return f"recipe {source}: " + "; ".join(problems)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Read, override and validate a recipe.

    Args:
        path: the YAML file.
        overrides: `KEY=VALUE` strings applied before validation.

    Returns:
        The validated recipe and the folder its relative paths resolve against.

    Raises:
        UserError: missing file, YAML syntax error, or any schema violation (all listed in one line).
    """
    source = Path(path)
    text = read_user_text(source, "recipe")
    try:
        raw = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {source}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {source}: expected a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"recipe {source}: schema_version is {raw.get('schema_version')!r}, "
            f"this converter reads {SCHEMA_VERSION}"
        )
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_format_validation_error(source, exc)) from None
    return LoadedRecipe(recipe=recipe, base_dir=source.resolve().parent, source_file=source)
