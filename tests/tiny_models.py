"""Registry of tiny random models with planted activation outliers, built from configs.

Random-init models have no outliers (max/median channel ~2), so quantization tests on them prove
little. `plant_outliers` scales a few channels of each producer up (norm weight, up_proj rows) and the
matching input columns of the consumers down: the float function is unchanged, but activations now
carry a few huge channels, as real LLMs do.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers import (BertConfig, BloomConfig, DistilBertConfig, Gemma2Config, Gemma3TextConfig, GemmaConfig,
                          GPT2Config, GPTNeoXConfig, GraniteConfig, LlamaConfig, MistralConfig, ModernBertConfig,
                          OPTConfig, Phi3Config, PhiConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config,
                          RobertaConfig, SmolLM3Config, Starcoder2Config, XLMRobertaConfig)

from converter.models.archs import arch_spec, conv1d_to_linear, head_layout

OUTLIER_CHANNELS = (3, 17, 42)
OUTLIER_FACTOR = 40.0
VOCAB = 320

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

_ENCODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=512)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),  # q/k/v carry biases
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),  # q_norm/k_norm after q/k_proj
    "llama-tied": lambda: LlamaConfig(**{**_COMMON, "tie_word_embeddings": True}),  # lm_head = embedding
    # LayerNorm with bias; fc1/fc2 export as Gemm; tied lm_head
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=64, max_position_embeddings=512, pad_token_id=1),
    # fused, per-head interleaved query_key_value; ALiBi; tied lm_head
    "bloom": lambda: BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
    # Conv1D (weights (in, out)), fused c_attn; tied lm_head
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                               bos_token_id=0, eos_token_id=0),
    # RMSNorm x_hat * (1 + w), q/k norms, GQA, tied lm_head; a sliding and a full block, which rotate
    # with different bases (sliding windows of 16 tokens here and below, so the tests decode past them)
    "gemma3": lambda: Gemma3TextConfig(**{**_COMMON, "tie_word_embeddings": True}, head_dim=16, sliding_window=16,
                                       layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
                                       bos_token_id=1, eos_token_id=2),
    # fused qkv_proj and gate_up_proj, GQA
    "phi3": lambda: Phi3Config(**_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=16),
    "smollm3": lambda: SmolLM3Config(**_COMMON, no_rope_layers=[1, 0], pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2),  # block 1 without RoPE
    # constant multipliers on embeddings, residual branches, attention scores and logits
    "granite": lambda: GraniteConfig(**_COMMON, embedding_multiplier=12.0, residual_multiplier=0.22,
                                     attention_multiplier=0.0625, logits_scaling=8.0, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2),
    # LayerNorm with bias, biased projections, GELU MLP
    "starcoder2": lambda: Starcoder2Config(**_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # RMSNorm x_hat * (1 + w), GeGLU, tied lm_head
    "gemma": lambda: GemmaConfig(**{**_COMMON, "tie_word_embeddings": True}, head_dim=16,
                                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Gemma 3's norms without q/k norms; attention and final logit soft-capping, sliding-window layers
    # (an attention cap small enough to move the tiny model's logits: by 1e-4, where 50 moves them 2e-7)
    "gemma2": lambda: Gemma2Config(**{**_COMMON, "tie_word_embeddings": True}, head_dim=16, sliding_window=16,
                                   attn_logit_softcapping=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # per-head interleaved query_key_value, parallel residual, partial rotary
    "gpt-neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25,
                                      bos_token_id=0, eos_token_id=0),
    # one LayerNorm feeds q/k/v and fc1 (parallel block), partial rotary, biased lm_head, no GQA (as Phi-2)
    # (2 heads of 32: a rotary width of 16, the least ONNX Runtime's GroupQueryAttention takes)
    "phi": lambda: PhiConfig(**{**_COMMON, "num_attention_heads": 2, "num_key_value_heads": 2}, partial_rotary_factor=0.5,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # post-LN encoders
    "bert": lambda: BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=512, architectures=["BertModel"]),
    "bert-cls": lambda: BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=512, num_labels=3,
                                   architectures=["BertForSequenceClassification"]),
    "bert-ner": lambda: BertConfig(**_ENCODER, num_labels=5, architectures=["BertForTokenClassification"]),
    # RoBERTa-style: one segment type (no token_type_ids input), positions offset past the padding id
    "roberta": lambda: RobertaConfig(**_ENCODER, type_vocab_size=1, pad_token_id=1, architectures=["RobertaModel"]),
    "roberta-cls": lambda: RobertaConfig(**_ENCODER, type_vocab_size=1, pad_token_id=1, num_labels=3,
                                         architectures=["RobertaForSequenceClassification"]),
    "xlm-roberta": lambda: XLMRobertaConfig(**_ENCODER, type_vocab_size=1, pad_token_id=1,
                                            architectures=["XLMRobertaModel"]),
    # pre-LN encoder with fused Wqkv and GeGLU Wi, alternating global/local attention; block 0 has no attn_norm
    "modernbert": lambda: ModernBertConfig(**{**_ENCODER, "num_hidden_layers": 3}, global_attn_every_n_layers=2,
                                           local_attention=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                           cls_token_id=1, sep_token_id=2, architectures=["ModernBertModel"]),
    "distilbert": lambda: DistilBertConfig(vocab_size=VOCAB, dim=64, hidden_dim=160, n_layers=2, n_heads=4,
                                           max_position_embeddings=512, architectures=["DistilBertModel"]),
    "distilbert-cls": lambda: DistilBertConfig(vocab_size=VOCAB, dim=64, hidden_dim=160, n_layers=2, n_heads=4,
                                               max_position_embeddings=512, num_labels=3,
                                               architectures=["DistilBertForSequenceClassification"]),
}
DECODERS = ("llama", "qwen2", "qwen3", "mistral", "smollm3", "granite", "starcoder2", "opt", "bloom", "gpt2",
            "gpt-neox", "gemma", "gemma2", "gemma3", "phi", "phi3")
ENCODERS = ("bert", "bert-cls", "bert-ner", "roberta", "roberta-cls", "xlm-roberta", "modernbert",
            "distilbert", "distilbert-cls")


@torch.no_grad()
def plant_outliers(model: torch.nn.Module, channels=OUTLIER_CHANNELS, factor=OUTLIER_FACTOR) -> None:
    """Function-preserving: producer channel c times `factor`, consumer input column c divided by it."""
    spec = arch_spec(model)
    layout = head_layout(model.config)
    idx = torch.tensor(channels)
    for block in model.get_submodule(spec.blocks):
        for group in spec.groups:
            if group.prev_kind == "linear_heads" and layout.group_size > 1:
                continue  # a v channel feeds several o_proj columns; not worth planting there
            prev = block.get_submodule(group.prev)
            if getattr(prev, "weight", None) is None:
                continue  # ModernBERT block 0: no attn_norm
            rows = idx if group.prev_rows is None else group.prev_rows.indices(layout)[idx]
            if group.prev_kind == "norm":
                prev.weight[rows] = (spec.norm_offset + prev.weight[rows]) * factor - spec.norm_offset
            else:
                prev.weight[rows, :] *= factor
            if getattr(prev, "bias", None) is not None:
                prev.bias[rows] *= factor
            for name in group.balance:
                block.get_submodule(name).weight[:, idx] /= factor


@torch.no_grad()
def plant_norm_outliers(model: torch.nn.Module, channels=OUTLIER_CHANNELS, factor=8.0) -> None:
    """Post-LN encoders: their LayerNorm outputs feed the residual too, so no function-preserving
    outlier exists there. Real BERTs have outlier channels in exactly those outputs (MiniLM: channel
    99), so the tiny encoders get them by construction (a different random model, not the same one)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight[list(channels)] *= factor


def _model_class(config):
    name = config.architectures[0] if config.architectures else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]
    return getattr(transformers, name)


@torch.no_grad()
def _checkpoint_layout(model: torch.nn.Module) -> torch.nn.Module:
    """The model as its HF class stores it: `build_tiny` swapped Conv1D for Linear, the checkpoint has Conv1D."""
    from transformers.pytorch_utils import Conv1D

    fresh = _model_class(model.config)._from_config(model.config, dtype=torch.float32)
    state = model.state_dict()
    for name, module in fresh.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            value = state[f"{name}.{pname}" if name else pname]
            param.copy_(value.T if isinstance(module, Conv1D) and pname == "weight" else value)
    return fresh


def build_tiny(arch: str, seed: int = 0, outliers: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch]()
    model = _model_class(config)._from_config(config, dtype=torch.float32, attn_implementation="eager")
    conv1d_to_linear(model)
    spec = arch_spec(model)
    with torch.no_grad():  # random-init norms are all ones (Gemma: zeros); give them some spread like trained ones
        for module in model.modules():
            if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None and module.weight.dim() == 1:
                module.weight.uniform_(0.5, 1.5).sub_(spec.norm_offset)
                if getattr(module, "bias", None) is not None:
                    module.bias.uniform_(-0.1, 0.1)
    if outliers:
        plant_outliers(model)
        if spec.kind == "encoder":
            plant_norm_outliers(model)
    return model.eval()


def tiny_tokenizer(text: str, bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE with fewer than VOCAB tokens, trained in milliseconds on `text`. With `bos`,
    it starts every text with a `<bos>` token, as Gemma's and Llama 3's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<bos>"] if bos else ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<bos>")


def save_tiny_checkpoint(arch: str, folder: Path, text: str, seed: int = 0, bos: bool = False) -> Path:
    """Write a tiny model with planted outliers and its tokenizer as an HF safetensors folder."""
    model = _checkpoint_layout(build_tiny(arch, seed=seed))
    model.save_pretrained(folder)
    tiny_tokenizer(text, bos=bos).save_pretrained(folder)
    return folder


MASSIVE_FACTOR = 100.0


def _freeze(param: torch.nn.Parameter, index) -> None:
    """Zero the gradient of `param[index]` (Adam without weight decay then never moves it)."""
    mask = torch.ones_like(param)
    mask[index] = 0
    param.register_hook(lambda grad: grad * mask)


def train_outlier_heavy_llama(text: str, steps: int = 150, seq_len: int = 64, seed: int = 0) -> torch.nn.Module:
    """A tiny Llama trained on `text`, whose every norm amplifies OUTLIER_CHANNELS (and up_proj those
    intermediate channels) by MASSIVE_FACTOR while the consumers read them at full weight.

    Why not `build_tiny`: a random model predicts text at chance (perplexity ~330 on 320 tokens), so no
    perturbation moves its perplexity ratio (unsmoothed W8A8 measured x0.9998); and `plant_outliers`'
    function-preserving outliers are exactly undone by alpha 0 (s = 1 / max|W| divides the planted
    factor back out of the weight columns it was put into). Here the planted entries and the columns
    that read them are frozen during training, so the activation outliers are not explained by small
    weights, as in real LLMs, and the trained rest predicts the text (held-out perplexity ~43).
    """
    model = build_tiny("llama", seed=seed, outliers=False).train()
    channels = torch.tensor(OUTLIER_CHANNELS)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[channels] = MASSIVE_FACTOR
                _freeze(norm.weight, channels)
            layer.mlp.up_proj.weight[channels] *= MASSIVE_FACTOR
            _freeze(layer.mlp.up_proj.weight, channels)
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                        layer.mlp.up_proj, layer.mlp.down_proj):
                _freeze(lin.weight, (slice(None), channels))  # the input columns reading the outliers
    tokenizer = tiny_tokenizer(text)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)  # (N, T)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)  # no decay: frozen stays frozen
    pick = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from more; on a busy machine they only contend
    try:
        for _ in range(steps):
            batch = windows[torch.randint(0, len(windows), (16,), generator=pick)]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval().requires_grad_(False)


def save_outlier_heavy_checkpoint(folder: Path, text: str) -> Path:
    """`train_outlier_heavy_llama` on `text` with the tokenizer it was trained with, as an HF folder."""
    train_outlier_heavy_llama(text).save_pretrained(folder)
    tiny_tokenizer(text).save_pretrained(folder)
    return folder


def sharded_bf16(arch: str, folder):
    """A tiny model stored as a BF16 checkpoint in several shards with their index, and the whole model
    read back from it in fp32 (what the whole-model path computes with)."""
    from transformers import AutoModelForCausalLM

    model = _checkpoint_layout(build_tiny(arch)).to(torch.bfloat16)  # GPT-2 stores Conv1D
    model.save_pretrained(folder, max_shard_size="100KB")
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    return model, whole
