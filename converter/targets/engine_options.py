"""Recipe section `engine`: how GPU engines (TensorRT) and programs (MIGraphX) are built.

The artifact's inputs are `input_ids` (batch, sequence) and `attention_mask`; each range is one
optimization profile dimension (min, opt, max). A KV-cache graph (`export.kv_cache`) also takes
`past_key_values.*` (batch, kv_heads, past_sequence, head_dim), and its attention_mask covers
past + current tokens, so its profile range is the sum of the two ranges.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DimRange(_Section):
    """min <= opt <= max for one dynamic dimension; TensorRT tunes kernels for `opt`."""

    min: int = Field(ge=1)
    opt: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "DimRange":
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"expected min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


class PastRange(DimRange):
    """Past length of a KV-cache graph: 0 is a prefill (zero-length past tensors)."""

    min: int = Field(ge=0)
    opt: int = Field(ge=0)


class EngineOptions(_Section):
    """Build settings shared by the TensorRT and MIGraphX targets."""

    batch: DimRange = Field(default=DimRange(min=1, opt=1, max=8), description=(
        "`{min, opt, max}` batch of the TensorRT optimization profile; MIGraphX compiles at `opt`."))
    sequence: DimRange = Field(default=DimRange(min=1, opt=256, max=2048), description=(
        "`{min, opt, max}` sequence length of the TensorRT optimization profile; MIGraphX compiles at "
        "`opt`."))
    past_sequence: PastRange = Field(default=PastRange(min=0, opt=256, max=2048), description=(
        "KV-cache graphs: past length range (0 = prefill); the mask's range is sequence + past; unused "
        "without a cache."))
    workspace_mb: int = Field(default=4096, ge=16, description=(
        "TensorRT workspace memory-pool limit."))
    builder_optimization_level: int = Field(default=3, ge=0, le=5, description=(
        "TensorRT builder optimization level: 0 fastest build .. 5 most tactics."))
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = Field(
        default="none", description=(
        "TensorRT: `none` (engine tied to the target's compute capability), `ampere_plus`, "
        "`same_compute_capability`."))
    version_compatible: bool = Field(default=False, description=(
        "TensorRT: engine also loads on later TensorRT versions (slower)."))
    tensorrt_version: str | None = Field(default=None, description=(
        "Expected TensorRT version: a build with another one is refused; names dry-run plans."))
    migraphx_fast_math: bool = Field(default=False, description=(
        "MIGraphX: approximate math in compiled kernels."))
