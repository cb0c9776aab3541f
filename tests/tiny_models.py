"""Registry of tiny random models with planted activation outliers, built from configs.

Random-init models have no outliers (max/median channel ~2), so quantization tests on them prove
little. `plant_outliers` scales a few channels of each producer up (norm weight, up_proj rows) and the
matching input columns of the consumers down: the float function is unchanged, but activations now
carry a few huge channels, as real LLMs do.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

from converter.archs import arch_spec

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

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "qwen2": lambda: Qwen2Config(**_COMMON),  # q/k/v carry biases
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),  # q_norm/k_norm after q/k_proj
    "llama-tied": lambda: LlamaConfig(**{**_COMMON, "tie_word_embeddings": True}),  # lm_head = embedding
}


@torch.no_grad()
def plant_outliers(model: torch.nn.Module, channels=OUTLIER_CHANNELS, factor=OUTLIER_FACTOR) -> None:
    """Function-preserving: producer channel c times `factor`, consumer input column c divided by it."""
    spec = arch_spec(model)
    idx = torch.tensor(channels)
    for block in model.get_submodule(spec.blocks):
        for group in spec.groups:
            if group.prev_kind == "linear_heads":
                continue
            prev = block.get_submodule(group.prev)
            if group.prev_kind == "norm":
                prev.weight[idx] *= factor
            else:
                prev.weight[idx, :] *= factor
            for name in group.balance:
                block.get_submodule(name).weight[:, idx] /= factor


def build_tiny(arch: str, seed: int = 0, outliers: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch](), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # random-init norms are all ones; give them some spread like trained ones
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    if outliers:
        plant_outliers(model)
    return model.eval()


def tiny_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE with fewer than VOCAB tokens, trained in milliseconds on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def save_tiny_checkpoint(arch: str, folder: Path, text: str, seed: int = 0) -> Path:
    """Write a tiny model with planted outliers and its tokenizer as an HF safetensors folder."""
    model = build_tiny(arch, seed=seed)
    model.save_pretrained(folder)
    tiny_tokenizer(text).save_pretrained(folder)
    return folder
