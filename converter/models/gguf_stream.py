"""A GGUF checkpoint written as an fp32 HF safetensors folder one tensor at a time.

`from_pretrained(gguf_file=...)` dequantizes every tensor into one state dict and `save_pretrained`
then copies it again: 14.4 GB peak for a 1.5B model. Here `gguf`'s reader memory-maps the file for
its tensor table; each tensor is read and dequantized on its own (in row chunks, so the dequantizer's
temporaries stay small), renamed and un-permuted by transformers' own GGUF tables, and handed to a
shard writer that keeps at most `shard_bytes` of finished tensors before writing them out. Peak
memory is one shard (or the largest tensor) plus the tokenizer, not the model: 2.0 GB for
Qwen2.5-Coder-1.5B (6.2 GB of fp32).

Weights stay float32: the values a K-quant dequantizes to (block scale x 4/6-bit code) are exact in
fp32 and would be rounded again in bf16, and the converter calibrates and compares in fp32 anyway.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from converter.errors import UserError, first_line, listed

SHARD_BYTES = 1 << 30  # finished tensors held before a shard is written; the largest tensor may exceed it
DEQUANT_CHUNK_BYTES = 16 << 20  # fp32 output per dequantization step: bounds gguf's numpy temporaries
INDEX_NAME = "model.safetensors.index.json"


class ShardWriter:
    """Collects named tensors and writes them as `model-0000i-of-0000n.safetensors` shards (or one
    `model.safetensors`), plus the index transformers reads for a sharded folder."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES):
        self.folder = folder
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # names per written shard, in order
        self.total_bytes = 0
        self.total_params = 0

    def make_room(self, nbytes: int) -> None:
        """Flush the pending shard if a tensor of `nbytes` would overfill it (called before the tensor
        is produced, so the two are never in memory together)."""
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.make_room(tensor.nbytes)
        self.pending[name] = tensor
        self.pending_bytes += tensor.nbytes
        self.total_bytes += tensor.nbytes
        self.total_params += tensor.numel()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, self.folder / f".shard-{len(self.shards)}", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is pending, give the shards their final names; returns the file names."""
        if self.pending:
            self._flush()
        count = len(self.shards)
        names = (["model.safetensors"] if count == 1 else
                 [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        for i, name in enumerate(names):
            os.replace(self.folder / f".shard-{i}", self.folder / name)
        if count > 1:
            weight_map = {tensor: names[i] for i, shard in enumerate(self.shards) for tensor in shard}
            index = {"metadata": {"total_parameters": self.total_params, "total_size": self.total_bytes},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


def _dequantized(path: Path, tensor, chunk_bytes: int) -> np.ndarray:
    """One GGUF tensor as float32 (GGUF's row-major numpy shape), read with plain file reads rather
    than through the map: mapped pages would stay resident and count against the process.

    `tensor.data` is the reader's view: (rows, row_bytes) uint8 for block types, the values for
    F32/F16. Blocks never straddle rows, so dequantizing row chunks gives the whole tensor's values.
    """
    from gguf.quants import dequantize

    view = tensor.data
    rows = view.shape[0]
    row_bytes = view.nbytes // rows
    step = max(1, chunk_bytes // (int(tensor.n_elements) // rows * 4))  # rows whose fp32 values fit
    out = None
    with open(path, "rb") as fh:
        for start in range(0, rows, step):
            n = min(step, rows - start)
            fh.seek(tensor.data_offset + start * row_bytes)
            raw = np.fromfile(fh, dtype=view.dtype, count=n * (row_bytes // view.itemsize))
            values = dequantize(raw.reshape(n, *view.shape[1:]), tensor.tensor_type)
            if out is None:
                out = np.empty((rows, *values.shape[1:]), dtype=np.float32)
            out[start:start + n] = values
    return out


def _skeleton(config):
    """The model transformers would build for this config, without storage: only its names, shapes
    and tied weights are needed."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _hf_tensor(gguf_path: Path, tensor, processor, name_map: dict,
               chunk_bytes: int) -> tuple[str, torch.Tensor]:
    """One GGUF tensor as transformers' loader turns it into a parameter: (HF name, fp32 tensor)."""
    result = processor.process(weights=_dequantized(gguf_path, tensor, chunk_bytes), name=tensor.name,
                               tensor_key_mapping=name_map, parsed_parameters={"tensors": {}})
    if result.name is None:
        raise UserError(f"GGUF {gguf_path.name}: tensor {tensor.name} is merged into others (MoE experts); "
                        "streamed materialization handles dense models only")
    return name_map[result.name], torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))


def write_tensors(gguf_path: Path, model, writer: ShardWriter,
                  chunk_bytes: int = DEQUANT_CHUNK_BYTES) -> None:
    """Every GGUF tensor the model has a parameter for, renamed and processed as transformers' GGUF
    loader does (`load_gguf_checkpoint`: its name map, its per-architecture processor), into `writer`.

    Raises:
        UserError: the architecture's processor merges tensors (MoE experts: not streamable one by
            one), or the file lacks a tensor the model needs.
    """
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint)

    reader = GGUFReader(gguf_path)
    architecture = str(reader.fields["general.architecture"].contents())
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(
        config=load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"])
    name_map = get_gguf_hf_weights_map(model, processor)
    written = set()
    for tensor in reader.tensors:
        if tensor.name not in name_map:  # e.g. rope_freqs: transformers computes it, so drops it too
            continue
        writer.make_room(int(tensor.n_elements) * 4)
        hf_name, weights = _hf_tensor(gguf_path, tensor, processor, name_map, chunk_bytes)
        writer.add(hf_name, weights)
        written.add(hf_name)
        del weights  # the writer owns it now: a flushed shard must free it, not this loop
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(set(model.state_dict()) - written - tied)
    if missing:
        raise UserError(f"GGUF {gguf_path.name} has no tensors for {listed(missing)} ({architecture})")


def gguf_to_folder(gguf_path: Path, folder: Path, name: str, shard_bytes: int = SHARD_BYTES,
                   chunk_bytes: int = DEQUANT_CHUNK_BYTES) -> None:
    """Write `gguf_path` into `folder` as what `from_pretrained(gguf_file=...)` + `save_pretrained`
    writes (config.json, generation_config.json, tokenizer files, fp32 safetensors), streamed.

    Args:
        name: recorded as the config's `_name_or_path`.
        shard_bytes: largest group of tensors held before a shard is written.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    # The same metadata readers from_pretrained(gguf_file=...) uses, for config and tokenizer alike.
    try:
        config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, KeyError) as exc:  # an architecture transformers cannot load from GGUF
        raise UserError(f"GGUF {gguf_path.name}: transformers cannot build a config from it "
                        f"({first_line(exc)})") from None
    config._name_or_path = name
    model = _skeleton(config)
    writer = ShardWriter(folder, shard_bytes)
    write_tensors(gguf_path, model, writer, chunk_bytes)
    writer.close()
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(folder)
    if model.can_generate():
        GenerationConfig.from_model_config(model.config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(folder)
