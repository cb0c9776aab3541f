"""Synthetic checkpoints of the sizes users deploy, for memory and time measurements only.

    .venv/bin/python bench/synthetic.py llama-3.2-3b OUT_DIR [--tokenizer DIR] [--shard-gb 2]
    .venv/bin/python bench/synthetic.py llama-3.1-8b OUT_DIR

Writes a Hugging Face folder in the layout real sharded checkpoints have: `config.json`, BF16
weights in `model-0000k-of-0000n.safetensors` shards with `model.safetensors.index.json`, and a
tokenizer copied from `--tokenizer` (default: the materialized SmolLM2 folder; its ids are all
below these models' vocabulary, which is all a conversion needs). The weights are random
(normal, std 0.02; norms 1), written one shard at a time, so writing needs about one shard of
memory. THEIR ACCURACY IS MEANINGLESS: a conversion of them measures peak memory and time, and
every figure quoted from one must say so. The folders are large (3B: 6.4 GB, 8B: 16 GB) and are
never committed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False, "head_dim": 128,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
           "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}
SHAPES = {  # the public configs' shapes
    "llama-3.2-3b": {**_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
                     "rope_scaling": {**_LLAMA3["rope_scaling"], "factor": 8.0}},
    # a few MB with the same layout, for the tests of this script and of sharded loading
    "tiny": {**_LLAMA3, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "head_dim": 16,
             "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False, "vocab_size": 512,
             "max_position_embeddings": 2048, "rope_scaling": None},
}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every weight of a LlamaForCausalLM with this config, in the order HF saves them."""
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shapes.update({f"{p}.input_layernorm.weight": (h,), f"{p}.self_attn.q_proj.weight": (q, h),
                       f"{p}.self_attn.k_proj.weight": (kv, h), f"{p}.self_attn.v_proj.weight": (kv, h),
                       f"{p}.self_attn.o_proj.weight": (h, q), f"{p}.post_attention_layernorm.weight": (h,),
                       f"{p}.mlp.gate_proj.weight": (i, h), f"{p}.mlp.up_proj.weight": (i, h),
                       f"{p}.mlp.down_proj.weight": (h, i)})
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    return shapes


def write_checkpoint(shape: str, out: Path, tokenizer: Path, shard_bytes: int, seed: int = 0) -> dict:
    """Write the synthetic checkpoint `shape` into `out`; returns the index's metadata."""
    from safetensors.torch import save_file

    cfg = SHAPES[shape]
    shapes = tensor_shapes(cfg)
    shards: list[list[str]] = [[]]
    size = 0
    for name, dims in shapes.items():
        nbytes = 2 * torch.Size(dims).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, names in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.ones(shapes[n]) if n.endswith("norm.weight") else
                       torch.randn(shapes[n], generator=generator) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({n: file for n in names})
        del tensors
        print(f"  {file}: {len(names)} tensors", file=sys.stderr)
    index = {"metadata": {"total_size": total, "synthetic": "random weights: accuracy is meaningless"},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, out / name)
    return index["metadata"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER,
                        help="folder whose tokenizer files are copied (default: the materialized SmolLM2)")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    args = parser.parse_args()
    if not (args.tokenizer / "tokenizer.json").is_file():
        raise SystemExit(f"error: {args.tokenizer} has no tokenizer.json (convert the SmolLM2 recipe once, "
                         "or pass --tokenizer DIR)")
    meta = write_checkpoint(args.shape, args.out, args.tokenizer, int(args.shard_gb * 1024**3))
    print(f"{args.out}: {args.shape}, {meta['total_size'] / 1e9:.2f} GB of BF16 random weights "
          "(for memory and time only: accuracy is meaningless)")


if __name__ == "__main__":
    main()
