"""Lazy weights: a decoder whose blocks are read from its (sharded) safetensors one at a time.

The skeleton is built without parameter storage (accelerate's empty weights; buffers such as rotary
tables are real). What sits outside the blocks (embeddings, final norm, head) is read once; a block is
read when a stage needs it and released after, so memory follows the largest block rather than the
model. Tensors rest on disk in their stored dtype (BF16 and FP16 checkpoints are the common case) and
are computed in fp32, as the whole-model path loads them.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError

from converter.errors import UserError, first_line, listed
from converter.models.archs import ArchSpec

INDEX = "model.safetensors.index.json"
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _return_freed_blocks() -> None:
    """Serve allocations of 1 MB and more by mmap, so a released block's memory goes back to the system.

    glibc raises its mmap threshold each time such a chunk is freed (up to 32 MB); freed blocks then
    stay in the heap, and a block-by-block pass grows by most of a block per block (a 12-block model
    of 17 MB blocks: +146 MB by the end, +50 MB with the threshold fixed). Elsewhere than glibc: nothing.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


class LazyCheckpoint:
    """The tensor names of a safetensors checkpoint (one file, or shards with their index) and reads
    of the tensors under one prefix.

    Raises:
        UserError: no safetensors in the folder, or an index naming a shard that is missing.
    """

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise UserError(f"checkpoint folder {folder}: {INDEX} names shards that are missing: {listed(missing)}")
        else:
            weight_map = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as fh:
                    weight_map.update(dict.fromkeys(fh.keys(), path.name))
        if not weight_map:
            raise UserError(f"checkpoint folder {folder} has no *.safetensors weights to stream")
        self.weight_map = weight_map

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors in their stored dtype, each shard opened once."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, wanted in sorted(by_file.items()):
            try:
                with safe_open(str(self.folder / file), framework="pt") as fh:
                    absent = sorted(set(wanted) - set(fh.keys()))
                    if absent:
                        raise UserError(f"checkpoint folder {self.folder}: shard {file} has no tensor {listed(absent)}, "
                                        f"which {INDEX} places there")
                    for name in wanted:
                        out[name] = fh.get_tensor(name)
            except (OSError, SafetensorError) as exc:  # a truncated or damaged shard
                raise UserError(f"checkpoint folder {self.folder}: shard {file} could not be read: {first_line(exc)}") from None
        return out


class StreamedModel:
    """A decoder skeleton and its checkpoint: `materialize` reads one module's weights in fp32 (or
    `dtype`), `release` returns them to storage-less (meta) tensors.

    Args:
        folder: an HF folder (config.json and safetensors).
        spec: the architecture's entry in the table (where the blocks are).

    Raises:
        UserError: an encoder, a model whose layers differ in kind (sliding-window and global
            attention alternating: each kind takes its own mask), a tensor transformers converts on
            load, or weights outside the blocks that the checkpoint lacks.
    """

    def __init__(self, folder: Path, spec: ArchSpec, trust_remote_code: bool = False,
                 dtype: torch.dtype = torch.float32):
        import transformers
        from accelerate import init_empty_weights

        if spec.kind != "decoder":
            raise UserError(f"checkpoint folder {folder}: block streaming covers decoders; this is an {spec.kind}")
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        kinds = sorted(set(getattr(config, "layer_types", None) or []))
        if len(kinds) > 1:
            raise UserError(f"checkpoint folder {folder}: its layers are of {len(kinds)} kinds ({', '.join(kinds)}), "
                            "each with its own attention mask; block streaming replays one mask for every block")
        self.ckpt = LazyCheckpoint(folder)
        self.spec = spec
        _return_freed_blocks()
        name = (config.architectures or [None])[0]
        cls = getattr(transformers, name, None) if name else None
        if cls is None or not hasattr(cls, "_from_config"):
            cls = transformers.AutoModelForCausalLM
        with init_empty_weights():
            model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
        # computed in `dtype` (bfloat16: parity's yardstick), as the whole model after `.to(dtype)`:
        # the buffers (rotary tables) cast too, every weight read as fp32 and then cast
        self.dtype = dtype
        self.model = model.to(dtype).eval()
        # called on every module `materialize` reads, as (prefix, module): e.g. smoothing each block
        # as it is read (converter/quant/sequential.py), so every later pass sees the smoothed block
        self.prepare: Callable[[str, torch.nn.Module], None] | None = None
        self.blocks = self.model.get_submodule(spec.blocks)
        self.stored = self._stored_names()
        self._resident()

    def _stored_names(self) -> dict[str, str]:
        """Module parameter name -> checkpoint tensor name, by transformers' own renamings (older
        checkpoints store e.g. GPT-NeoX's head as `embed_out`, a base model without its prefix).

        Raises:
            UserError: a tensor transformers would merge or split on load (fused experts): not streamed.
        """
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(self.model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
        meta = self.model.state_dict()
        names = {}
        for key in self.ckpt.names():
            name, converted = rename_source_key(key, renamings, converters, self.model.base_model_prefix, meta)
            if converted is not None:
                raise UserError(f"checkpoint folder {self.ckpt.folder}: tensor {key} is converted on load ({converted}); "
                                "block streaming reads tensors as stored")
            names[name] = key
        return names

    def block_prefix(self, index: int) -> str:
        return f"{self.spec.blocks}.{index}"

    def block_of(self, name: str) -> str | None:
        """The prefix of the block that holds the full parameter or module `name`; None outside the blocks."""
        inside = self.spec.blocks + "."
        return inside + name[len(inside):].split(".", 1)[0] if name.startswith(inside) else None

    def _resident(self) -> None:
        """Read every weight outside the blocks (embeddings, final norm, head) and tie the head."""
        inside = self.spec.blocks + "."
        wanted = [n for n, p in self.model.named_parameters() if not n.startswith(inside)]
        stored = set(self.stored)
        tied = {n for n in wanted if n not in stored and n == f"{self.spec.lm_head}.weight"
                and getattr(self.model.config, "tie_word_embeddings", False)}
        missing = sorted(set(wanted) - stored - tied)
        if missing:
            raise UserError(f"checkpoint folder {self.ckpt.folder}: weights {listed(missing)} are missing")
        self._assign(self.model, "", sorted(set(wanted) - tied))
        if tied:
            self.model.tie_weights()

    def materialize(self, prefix: str) -> torch.nn.Module:
        """The module at `prefix` with its weights read from the checkpoint, in fp32.

        Raises:
            UserError: the checkpoint lacks some of the module's weights.
        """
        module = self.model.get_submodule(prefix)
        expected = {f"{prefix}.{n}" for n, _ in module.named_parameters()}
        missing = sorted(expected - set(self.stored))
        if missing:
            raise UserError(f"checkpoint folder {self.ckpt.folder}: weights {listed(missing)} are missing")
        self._assign(module, prefix + ".", sorted(expected))
        if self.prepare is not None:
            self.prepare(prefix, module)
        return module

    def _assign(self, module: torch.nn.Module, prefix: str, names: list[str]) -> None:
        """Read the named parameters (full names) into `module` in fp32, their shapes checked against the skeleton."""
        params = dict(module.named_parameters())
        stored = self.ckpt.read([self.stored[n] for n in names])
        state = {}
        for name in names:
            tensor, local = stored[self.stored[name]], name[len(prefix):]
            if tuple(tensor.shape) != tuple(params[local].shape):
                raise UserError(f"checkpoint folder {self.ckpt.folder}: weight {name} is {tuple(tensor.shape)}, "
                                f"config.json builds {tuple(params[local].shape)}")
            state[local] = tensor.float().to(self.dtype)
        module.load_state_dict(state, strict=False, assign=True)

    def release(self, prefix: str) -> None:
        """Drop the module's weights: its parameters become meta tensors again (buffers stay)."""
        for module in self.model.get_submodule(prefix).modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                                                  requires_grad=False)
