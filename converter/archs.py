"""Architecture table: which layer feeds which linears, as data.

Each supported HF class maps to an `ArchSpec`. The stages never branch on the architecture; they
read these tables. Adding a family means adding an entry here (and a tiny test model), nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from converter.errors import UserError


@dataclass(frozen=True)
class SmoothGroup:
    """One SmoothQuant migration inside a block.

    `prev` produces the activation that every module in `balance` reads. Its output channels are
    divided by s and the balance linears' input columns multiplied by s, so the float function is
    unchanged while the activation outliers shrink.

    Attributes:
        name: the recipe name of the group (`smoothing.groups`).
        prev: module (relative to the block) whose output is scaled by 1/s.
        prev_kind: "norm" (RMSNorm/LayerNorm weight), "linear" (rows of a linear), or
            "linear_heads" (v_proj rows feeding o_proj through attention heads, with GQA sharing).
        balance: linears (relative to the block) whose input columns absorb s.
    """

    name: str
    prev: str
    prev_kind: Literal["norm", "linear", "linear_heads"]
    balance: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    """What the pipeline needs to know about one HF model class.

    Attributes:
        blocks: attribute path of the ModuleList of transformer blocks.
        linears: quantizable linears inside each block, relative to the block.
        groups: smoothing groups inside each block.
        lm_head: attribute path of the output projection.
        head_group: smoothing group of the final norm into the lm_head (paths from the model root).
        norm_offset: the norm computes x_hat * (norm_offset + weight); 1.0 for Gemma-style norms.
        kind: "decoder" (causal LM, exports logits) or "encoder".
    """

    blocks: str
    linears: tuple[str, ...]
    groups: tuple[SmoothGroup, ...]
    lm_head: str = "lm_head"
    head_group: SmoothGroup | None = None
    norm_offset: float = 0.0
    kind: Literal["decoder", "encoder"] = "decoder"


_LLAMA_LIKE = ArchSpec(
    blocks="model.layers",
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    groups=(
        SmoothGroup(
            "attn_in",
            "input_layernorm",
            "norm",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ),
        SmoothGroup("mlp_in", "post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
        SmoothGroup("mlp_down", "mlp.up_proj", "linear", ("mlp.down_proj",)),
        SmoothGroup("attn_out", "self_attn.v_proj", "linear_heads", ("self_attn.o_proj",)),
    ),
    head_group=SmoothGroup("head_in", "model.norm", "norm", ("lm_head",)),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    # Qwen3 adds q_norm/k_norm *after* q/k_proj: they do not touch the smoothed input channels.
    "Qwen3ForCausalLM": _LLAMA_LIKE,
}


def arch_spec(model: torch.nn.Module) -> ArchSpec:
    """The table entry for a model's class.

    Raises:
        UserError: the class is not in the table (the message lists the supported classes).
    """
    return spec_for(type(model).__name__)


def spec_for(class_name: str) -> ArchSpec:
    """The table entry for an HF class name (as in config.json `architectures`).

    Raises:
        UserError: the class is not in the table (the message lists the supported classes).
    """
    if class_name not in ARCHITECTURES:
        raise UserError(
            f"architecture {class_name} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[class_name]


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head (1 without GQA)."""
        return self.num_heads // self.num_kv_heads


def head_layout(config) -> HeadLayout:
    """Attention head layout from an HF config (handles configs without `head_dim`)."""
    num_heads = config.num_attention_heads
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return HeadLayout(num_heads, num_kv, head_dim)


def block_linear_names(model: torch.nn.Module, spec: ArchSpec) -> list[str]:
    """Full module names of every quantizable linear, block by block, plus the lm_head."""
    blocks = model.get_submodule(spec.blocks)
    names = [f"{spec.blocks}.{i}.{lin}" for i in range(len(blocks)) for lin in spec.linears]
    if spec.lm_head:
        names.append(spec.lm_head)
    return names
