"""Architecture table: which layer feeds which linears, as data.

Each supported HF class maps to an `ArchSpec`. The stages never branch on the architecture; they
read these tables. Adding a family means adding an entry here (and a tiny test model), nothing else;
a recipe can also supply an entry for a class that is not here (`architecture:` section).

Only function-preserving pairs belong in a table: a producer whose output reaches anything besides
the balance linears (a post-LayerNorm output that also feeds the residual, as in BERT) or a
non-linearity between producer and consumer that does not commute with a positive scale (GELU;
ReLU and the linear `up` half of a gated MLP do commute) cannot absorb a smoothing scale.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from converter.errors import UserError


@dataclass(frozen=True)
class FusedRows:
    """The rows of a fused linear (Phi3 `qkv_proj`, GPT-2 `c_attn`, BLOOM `query_key_value`) that
    produce a group's activation.

    Attributes:
        parts: sizes of the fused parts in output-row order: "q" (heads x head_dim), "kv" (key/value
            heads x head_dim) or "ffn" (intermediate_size).
        take: index of the part the balance linears read.
        per_head: parts are interleaved head by head, rows (heads, parts, head_dim) (BLOOM), rather
            than concatenated.
    """

    parts: tuple[Literal["q", "kv", "ffn"], ...]
    take: int
    per_head: bool = False

    def indices(self, layout: HeadLayout) -> torch.Tensor:
        """(n,) int64 row indices of the taken part."""
        if self.per_head:
            n_parts, hd = len(self.parts), layout.head_dim
            head = torch.arange(layout.num_heads).view(-1, 1) * n_parts * hd
            return (head + self.take * hd + torch.arange(hd).view(1, -1)).reshape(-1)
        sizes = {"q": layout.num_heads * layout.head_dim, "kv": layout.num_kv_heads * layout.head_dim,
                 "ffn": layout.intermediate_size}
        start = sum(sizes[p] for p in self.parts[: self.take])
        return torch.arange(start, start + sizes[self.parts[self.take]])


@dataclass(frozen=True)
class SmoothGroup:
    """One SmoothQuant migration inside a block.

    `prev` produces the activation that every module in `balance` reads. Its output channels are
    divided by s and the balance linears' input columns multiplied by s, so the float function is
    unchanged while the activation outliers shrink.

    Attributes:
        name: the recipe name of the group (`smoothing.groups`).
        prev: module (relative to the block) whose output is scaled by 1/s.
        prev_kind: "norm" (RMSNorm/LayerNorm weight, and bias if any), "linear" (rows of a linear),
            or "linear_heads" (value rows feeding the output projection through attention heads,
            with GQA sharing).
        balance: linears (relative to the block) whose input columns absorb s.
        prev_rows: for a fused `prev` linear, which of its rows produce the activation.
    """

    name: str
    prev: str
    prev_kind: Literal["norm", "linear", "linear_heads"]
    balance: tuple[str, ...]
    prev_rows: FusedRows | None = None


@dataclass(frozen=True)
class ArchSpec:
    """What the pipeline needs to know about one HF model class.

    Attributes:
        blocks: attribute path of the ModuleList of transformer blocks.
        linears: quantizable linears inside each block, relative to the block.
        groups: smoothing groups inside each block.
        lm_head: attribute path of the output projection ("" when there is none).
        head_group: smoothing group of the final norm into the lm_head (paths from the model root).
        norm_offset: the norm computes x_hat * (norm_offset + weight); 1.0 for Gemma-style norms.
        kind: "decoder" (causal LM) or "encoder" (bidirectional, no generation).
        output: the model output the export returns (`logits`, `last_hidden_state`).
        config_requires: (config attribute, value) pairs the groups assume; a checkpoint whose config
            differs (post-LN OPT-350m, BLOOM with the residual taken after the LayerNorm) is refused
            rather than smoothed into a different function.
        grouped_attention: export grouped-query attention without repeating the cache per query head
            (converter/export/grouped_attention.py); it only applies where KV heads are shared.
    """

    blocks: str
    linears: tuple[str, ...]
    groups: tuple[SmoothGroup, ...]
    lm_head: str = "lm_head"
    head_group: SmoothGroup | None = None
    norm_offset: float = 0.0
    kind: Literal["decoder", "encoder"] = "decoder"
    output: str = "logits"
    config_requires: tuple[tuple[str, object], ...] = ()
    grouped_attention: bool = True


_LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

_LLAMA_LIKE = ArchSpec(
    blocks="model.layers",
    linears=_LLAMA_LINEARS,
    groups=(
        SmoothGroup("attn_in", "input_layernorm", "norm", _QKV),
        SmoothGroup("mlp_in", "post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
        SmoothGroup("mlp_down", "mlp.up_proj", "linear", ("mlp.down_proj",)),
        SmoothGroup("attn_out", "self_attn.v_proj", "linear_heads", ("self_attn.o_proj",)),
    ),
    head_group=SmoothGroup("head_in", "model.norm", "norm", ("lm_head",)),
)

# Gemma 3: the norm before the MLP is `pre_feedforward_layernorm`; `post_attention_layernorm` and
# `post_feedforward_layernorm` normalize block outputs before the residual add, so they feed no linear.
_GEMMA3 = replace(
    _LLAMA_LIKE,
    groups=tuple(replace(g, prev="pre_feedforward_layernorm") if g.name == "mlp_in" else g for g in _LLAMA_LIKE.groups),
    norm_offset=1.0,  # Gemma3RMSNorm: x_hat * (1 + weight)
)

# StarCoder2: LayerNorms with bias, biased q/k/v/o, c_fc -> GELU -> c_proj (no mlp_down).
_STARCODER2 = ArchSpec(
    blocks="model.layers",
    linears=(*_QKV, "self_attn.o_proj", "mlp.c_fc", "mlp.c_proj"),
    groups=(
        SmoothGroup("attn_in", "input_layernorm", "norm", _QKV),
        SmoothGroup("mlp_in", "post_attention_layernorm", "norm", ("mlp.c_fc",)),
        SmoothGroup("attn_out", "self_attn.v_proj", "linear_heads", ("self_attn.o_proj",)),
    ),
    head_group=SmoothGroup("head_in", "model.norm", "norm", ("lm_head",)),
)

# Gemma (1): Llama's layout with Gemma's x_hat * (1 + weight) norms; GeGLU is gelu(gate) * up, linear in up.
_GEMMA = replace(_LLAMA_LIKE, norm_offset=1.0)

# Phi-3: q/k/v and gate/up are fused; down_proj reads act(gate) * up, linear in the `up` rows.
_PHI3 = ArchSpec(
    blocks="model.layers",
    linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    groups=(
        SmoothGroup("attn_in", "input_layernorm", "norm", ("self_attn.qkv_proj",)),
        SmoothGroup("mlp_in", "post_attention_layernorm", "norm", ("mlp.gate_up_proj",)),
        SmoothGroup("mlp_down", "mlp.gate_up_proj", "linear", ("mlp.down_proj",), FusedRows(("ffn", "ffn"), 1)),
        SmoothGroup("attn_out", "self_attn.qkv_proj", "linear_heads", ("self_attn.o_proj",),
                    FusedRows(("q", "kv", "kv"), 2)),
    ),
    head_group=SmoothGroup("head_in", "model.norm", "norm", ("lm_head",)),
)

# OPT (pre-LN, LayerNorm with bias): fc1 -> ReLU -> fc2, and ReLU(x / s) = ReLU(x) / s for s > 0.
_OPT = ArchSpec(
    blocks="model.decoder.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    groups=(
        SmoothGroup("attn_in", "self_attn_layer_norm", "norm", _QKV),
        SmoothGroup("mlp_in", "final_layer_norm", "norm", ("fc1",)),
        SmoothGroup("mlp_down", "fc1", "linear", ("fc2",)),
        SmoothGroup("attn_out", "self_attn.v_proj", "linear_heads", ("self_attn.out_proj",)),
    ),
    head_group=SmoothGroup("head_in", "model.decoder.final_layer_norm", "norm", ("lm_head",)),
    # OPT-350m is post-LN and projects 512 -> 1024 around the blocks: its norms feed other things
    config_requires=(("do_layer_norm_before", True), ("word_embed_proj_dim", "hidden_size")),
)

# BLOOM: query_key_value rows are (heads, [q, k, v], head_dim); ALiBi only biases the attention
# scores, so v -> dense is linear. GELU between dense_h_to_4h and dense_4h_to_h: no mlp_down.
_BLOOM = ArchSpec(
    blocks="transformer.h",
    linears=("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    groups=(
        SmoothGroup("attn_in", "input_layernorm", "norm", ("self_attention.query_key_value",)),
        SmoothGroup("mlp_in", "post_attention_layernorm", "norm", ("mlp.dense_h_to_4h",)),
        SmoothGroup("attn_out", "self_attention.query_key_value", "linear_heads", ("self_attention.dense",),
                    FusedRows(("q", "kv", "kv"), 2, per_head=True)),
    ),
    head_group=SmoothGroup("head_in", "transformer.ln_f", "norm", ("lm_head",)),
    # with the residual taken after the LayerNorm, its output also feeds the residual
    config_requires=(("apply_residual_connection_post_layernorm", False),),
)

# GPT-NeoX (Pythia): query_key_value rows are (heads, [q, k, v], head_dim) as in BLOOM. With the
# parallel residual each norm still feeds only its own branch; partial rotary touches q and k, not v.
_GPT_NEOX = ArchSpec(
    blocks="gpt_neox.layers",
    linears=("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    groups=(
        SmoothGroup("attn_in", "input_layernorm", "norm", ("attention.query_key_value",)),
        SmoothGroup("mlp_in", "post_attention_layernorm", "norm", ("mlp.dense_h_to_4h",)),
        SmoothGroup("attn_out", "attention.query_key_value", "linear_heads", ("attention.dense",),
                    FusedRows(("q", "kv", "kv"), 2, per_head=True)),
    ),
    head_group=SmoothGroup("head_in", "gpt_neox.final_layer_norm", "norm", ("lm_head",)),
)

# Phi (1, 1.5, 2): attention and MLP run in parallel on one LayerNorm, so q/k/v and fc1 share its scale.
_PHI = ArchSpec(
    blocks="model.layers",
    linears=(*_QKV, "self_attn.dense", "mlp.fc1", "mlp.fc2"),
    groups=(
        SmoothGroup("attn_in", "input_layernorm", "norm", (*_QKV, "mlp.fc1")),
        SmoothGroup("attn_out", "self_attn.v_proj", "linear_heads", ("self_attn.dense",)),
    ),
    head_group=SmoothGroup("head_in", "model.final_layernorm", "norm", ("lm_head",)),
    # q/k LayerNorms would sit between q/k_proj and attention: harmless, but not what this entry was tested on
    config_requires=(("qk_layernorm", False),),
)

# GPT-2: HF Conv1D modules are swapped for equivalent nn.Linear at load time (`conv1d_to_linear`),
# so every weight here is (out, in). c_attn rows are [q | k | v]. GELU in the MLP: no mlp_down.
_GPT2 = ArchSpec(
    blocks="transformer.h",
    linears=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    groups=(
        SmoothGroup("attn_in", "ln_1", "norm", ("attn.c_attn",)),
        SmoothGroup("mlp_in", "ln_2", "norm", ("mlp.c_fc",)),
        SmoothGroup("attn_out", "attn.c_attn", "linear_heads", ("attn.c_proj",), FusedRows(("q", "kv", "kv"), 2)),
    ),
    head_group=SmoothGroup("head_in", "transformer.ln_f", "norm", ("lm_head",)),
)

# BERT is post-LN: each LayerNorm output feeds the next linears *and* the residual, so it cannot
# absorb a scale. value -> attention.output.dense is the one function-preserving pair (no GQA).
_BERT_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense")
_BERT_GROUPS = (SmoothGroup("attn_out", "attention.self.value", "linear_heads", ("attention.output.dense",)),)
_BERT = ArchSpec(blocks="encoder.layer", linears=_BERT_LINEARS, groups=_BERT_GROUPS, lm_head="",
                 kind="encoder", output="last_hidden_state")


def _with_head(encoder: ArchSpec, base: str, head: str = "classifier") -> ArchSpec:
    """A task model's entry: the bare encoder's blocks under the `base` attribute, and its head."""
    return replace(encoder, blocks=f"{base}.{encoder.blocks}", lm_head=head, output="logits")


_BERT_CLASSIFIER = _with_head(_BERT, "bert")  # sequence and token classification alike
# RoBERTa / XLM-R share BERT's blocks; their classification head is dense -> tanh -> out_proj, and
# out_proj is the head (dense stays float, as BERT's pooler does).
_ROBERTA_CLASSIFIER = _with_head(_BERT, "roberta", "classifier.out_proj")
# token classification (NER): one linear on every token's hidden state
_ROBERTA_TOKENS = _with_head(_BERT, "roberta")
# ModernBERT is pre-LN (bias-free LayerNorms), so its norms do absorb scales: attn_norm -> Wqkv
# (rows [q | k | v]) and mlp_norm -> Wi (rows [input | gate], GeGLU: act(input) * gate is linear in
# gate). Block 0's attn_norm is nn.Identity (the embedding norm also feeds the residual): skipped.
_MODERNBERT_GROUPS = (
    SmoothGroup("attn_in", "attn_norm", "norm", ("attn.Wqkv",)),
    SmoothGroup("mlp_in", "mlp_norm", "norm", ("mlp.Wi",)),
    SmoothGroup("mlp_down", "mlp.Wi", "linear", ("mlp.Wo",), FusedRows(("ffn", "ffn"), 1)),
    SmoothGroup("attn_out", "attn.Wqkv", "linear_heads", ("attn.Wo",), FusedRows(("q", "kv", "kv"), 2)),
)
_MODERNBERT_LINEARS = ("attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo")
_MODERNBERT = ArchSpec(blocks="layers", linears=_MODERNBERT_LINEARS, groups=_MODERNBERT_GROUPS, lm_head="",
                       kind="encoder", output="last_hidden_state")
# the classification head is dense -> GELU -> LayerNorm -> classifier: classifier is the head
_MODERNBERT_CLASSIFIER = _with_head(_MODERNBERT, "model")
# DistilBERT: post-LN like BERT, other names; its classifier reads pre_classifier -> ReLU (float).
_DISTILBERT_LINEARS = ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
                       "ffn.lin1", "ffn.lin2")
_DISTILBERT_GROUPS = (SmoothGroup("attn_out", "attention.v_lin", "linear_heads", ("attention.out_lin",)),)
_DISTILBERT = ArchSpec(blocks="transformer.layer", linears=_DISTILBERT_LINEARS, groups=_DISTILBERT_GROUPS,
                       lm_head="", kind="encoder", output="last_hidden_state")
_DISTILBERT_CLASSIFIER = _with_head(_DISTILBERT, "distilbert")

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    # Qwen3 and Gemma3 add q_norm/k_norm *after* q/k_proj: they do not touch the smoothed input channels.
    "Qwen3ForCausalLM": _LLAMA_LIKE,
    # SmolLM3 skips RoPE in some layers; Granite scales embeddings, residuals, scores and logits by
    # constants: neither touches the norm -> linear pairs
    "SmolLM3ForCausalLM": _LLAMA_LIKE,
    "GraniteForCausalLM": _LLAMA_LIKE,
    "Starcoder2ForCausalLM": _STARCODER2,
    "GemmaForCausalLM": _GEMMA,
    # Gemma 2's block is Gemma 3's without q/k norms (soft-capping acts on scores and logits only)
    "Gemma2ForCausalLM": _GEMMA3,
    # Gemma 3's k_norm acts after the head transpose: with the cache no longer repeated before the
    # scores, ONNX Runtime's transpose optimizer moves that transpose into the norm, which then does
    # not fuse into one kernel (tests/export/test_exporter.py), so its attention exports as HF's eager
    "Gemma3ForCausalLM": replace(_GEMMA3, grouped_attention=False),
    "Phi3ForCausalLM": _PHI3,
    "PhiForCausalLM": _PHI,
    "OPTForCausalLM": _OPT,
    "BloomForCausalLM": _BLOOM,
    "GPT2LMHeadModel": _GPT2,
    "GPTNeoXForCausalLM": _GPT_NEOX,
    "BertModel": _BERT,
    "BertForSequenceClassification": _BERT_CLASSIFIER,
    "BertForTokenClassification": _BERT_CLASSIFIER,  # same paths; logits per token
    "RobertaModel": _BERT,
    "RobertaForSequenceClassification": _ROBERTA_CLASSIFIER,
    "XLMRobertaModel": _BERT,
    "XLMRobertaForSequenceClassification": _ROBERTA_CLASSIFIER,
    "RobertaForTokenClassification": _ROBERTA_TOKENS,
    "XLMRobertaForTokenClassification": _ROBERTA_TOKENS,
    "ModernBertModel": _MODERNBERT,
    "ModernBertForSequenceClassification": _MODERNBERT_CLASSIFIER,
    "ModernBertForTokenClassification": _MODERNBERT_CLASSIFIER,  # same paths; logits per token
    "DistilBertModel": _DISTILBERT,
    "DistilBertForSequenceClassification": _DISTILBERT_CLASSIFIER,
    "DistilBertForTokenClassification": _DISTILBERT_CLASSIFIER,  # same paths; logits per token
}

LAYER_MAP_FIELD = "architecture"  # the recipe section that supplies an entry for another class


def arch_spec(model: torch.nn.Module, override: ArchSpec | None = None) -> ArchSpec:
    """The table entry for a model's class (or `override`, a recipe-supplied entry).

    Raises:
        UserError: the class is not in the table (the message lists the supported classes).
    """
    return override if override is not None else spec_for(type(model).__name__)


def spec_for(class_name: str, override: ArchSpec | None = None) -> ArchSpec:
    """The table entry for an HF class name (as in config.json `architectures`).

    Raises:
        UserError: the class is not in the table and there is no override (the message lists the
            supported classes and names the recipe section that supplies a layer map).
    """
    if override is not None:
        return override
    if class_name not in ARCHITECTURES:
        raise UserError(
            f"architecture {class_name} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}; "
            f"or describe its layers in the recipe's `{LAYER_MAP_FIELD}:` section"
        )
    return ARCHITECTURES[class_name]


def spec_from_recipe(section) -> ArchSpec | None:
    """The `ArchSpec` a recipe's `architecture:` section describes (None without one)."""
    if section is None:
        return None

    def group(g) -> SmoothGroup:
        rows = None if g.prev_rows is None else FusedRows(tuple(g.prev_rows.parts), g.prev_rows.take,
                                                          g.prev_rows.per_head)
        return SmoothGroup(g.name, g.prev, g.prev_kind, tuple(g.balance), rows)

    return ArchSpec(blocks=section.blocks, linears=tuple(section.linears), groups=tuple(group(g) for g in section.groups),
                    lm_head=section.lm_head, head_group=group(section.head_group) if section.head_group else None,
                    norm_offset=section.norm_offset, kind=section.kind, output=section.output,
                    grouped_attention=section.grouped_attention)


def check_spec(model: torch.nn.Module, spec: ArchSpec, source: str) -> None:
    """Every path the entry names exists in `model`, and every quantizable linear is an nn.Linear.

    Raises:
        UserError: names the first missing or wrong module and `source` (the table or the recipe).
    """
    def module(root, path: str, where: str):
        try:
            return root.get_submodule(path)
        except AttributeError:
            raise UserError(f"{source}: {type(model).__name__} has no module {where}{path}") from None

    for attr, expected in spec.config_requires:
        # a string value names another config attribute that must be equal (OPT: projection width)
        value = getattr(model.config, attr, None)
        want = getattr(model.config, expected, None) if isinstance(expected, str) else expected
        if value != want:
            raise UserError(f"{source}: {type(model).__name__} entry assumes config {attr} = {want}, the "
                            f"checkpoint has {value}; describe this variant in the recipe's `{LAYER_MAP_FIELD}:` section")
    blocks = module(model, spec.blocks, "")
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise UserError(f"{source}: {spec.blocks} is not a non-empty list of blocks")
    block, where = blocks[0], f"{spec.blocks}.0."
    for path in spec.linears:
        if not isinstance(module(block, path, where), torch.nn.Linear):
            raise UserError(f"{source}: {where}{path} is {type(module(block, path, where)).__name__}, not a Linear")
    for group in spec.groups:
        for path in (group.prev, *group.balance):
            module(block, path, where)
    if spec.lm_head:
        module(model, spec.lm_head, "")
    if spec.head_group is not None:
        for path in (spec.head_group.prev, *spec.head_group.balance):
            module(model, path, "")


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int = 0

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head (1 without GQA)."""
        return self.num_heads // self.num_kv_heads


def head_layout(config) -> HeadLayout:
    """Attention head layout from an HF config (handles configs without `head_dim`)."""
    num_heads = config.num_attention_heads
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 0
    return HeadLayout(num_heads, num_kv, head_dim, ffn)


def block_linear_names(model: torch.nn.Module, spec: ArchSpec) -> list[str]:
    """Full module names of every quantizable linear, block by block, plus the lm_head."""
    blocks = model.get_submodule(spec.blocks)
    names = [f"{spec.blocks}.{i}.{lin}" for i in range(len(blocks)) for lin in spec.linears]
    if spec.lm_head:
        names.append(spec.lm_head)
    return names


@torch.no_grad()
def conv1d_to_linear(model: torch.nn.Module) -> int:
    """Swap every HF `Conv1D` (weight stored (in, out)) for an equal `nn.Linear` (weight (out, in)).

    Function-preserving; afterwards every quantizable weight is (out, in), so neither the quantizer
    nor the exporter ever sees a transposed weight. Returns how many modules were swapped.
    """
    from transformers.pytorch_utils import Conv1D

    swapped = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, Conv1D)]
    for name, conv in swapped:
        n_in, n_out = conv.weight.shape
        linear = torch.nn.Linear(n_in, n_out, bias=conv.bias is not None, dtype=conv.weight.dtype)
        linear.weight.copy_(conv.weight.T)
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, linear)
    return len(swapped)
