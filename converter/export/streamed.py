"""Export a block-streamed model (converter/models/lazy.py) without holding its weights.

The skeleton's blocks hold no weights, so `torch.onnx.export` traces the graph on placeholders of
their shapes, and their initializers get a lazy tensor instead: when the file is written, tensor
by tensor, block i is read from the checkpoint (and prepared as the streamed model prepares it, e.g.
smoothed), its weight is written to the external data, and the block is dropped again when the
next one is needed. Initializers are written in model order, so every block is read once.
`insert_qdq` then quantizes each linear from that file the same way, one MatMul at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import onnx_ir as ir
import torch

from converter.export.exporter import WRAPPED, export_program, save_program
from converter.models.lazy import StreamedModel

if TYPE_CHECKING:  # annotations only: the recipe sits above the stages
    from converter.recipe import Export


class BlockParameters:
    """Parameters of a streamed model by full name, with one block in memory at a time.

    The writer takes the initializers in model order, but those of 256 bytes or less (a small model's
    norm weights and biases) stay inside the .onnx file and are serialized after the external data.
    So a block's vectors are kept when the block is read: a few hidden-sized vectors per block, and
    every block is read once.
    """

    def __init__(self, streamed: StreamedModel):
        self.streamed = streamed
        self.prefix: str | None = None  # the block in memory
        self.vectors: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        if name in self.vectors:
            return self.vectors[name]
        prefix = self.streamed.block_of(name)
        if prefix is not None and prefix != self.prefix:
            self.release()
            block = self.streamed.materialize(prefix)
            self.prefix = prefix
            self.vectors.update({f"{prefix}.{n}": p.detach().clone() for n, p in block.named_parameters() if p.dim() < 2})
        return self.streamed.model.get_parameter(name).detach()

    def release(self) -> None:
        if self.prefix is not None:
            self.streamed.release(self.prefix)
            self.prefix = None


@contextlib.contextmanager
def _placeholders(model: torch.nn.Module) -> Iterator[set[int]]:
    """Give every meta parameter (the blocks not in memory) a CPU placeholder of its shape while the
    model is traced: the exporter refuses a mix of meta and real tensors (the KV cache inputs, the
    embeddings kept in memory). A placeholder is one zero broadcast to the shape (no storage of its
    own); the trace reads shapes only. Yields the ids of the placeholders; the meta tensors are back
    afterwards."""
    where: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                stand_in = torch.zeros((), dtype=param.dtype).expand(param.shape)
                module._parameters[name] = torch.nn.Parameter(stand_in, requires_grad=False)
                where.append((module, name, param))
    try:
        yield {id(module._parameters[name]) for module, name, _ in where}
    finally:
        for module, name, param in where:
            module._parameters[name] = param


def _lazy_parameter(value: Callable[[], torch.Tensor], like: ir.TensorProtocol) -> ir.LazyTensor:
    def compute() -> ir.Tensor:
        return ir.tensor(value().numpy(), name=like.name)

    return ir.LazyTensor(compute, dtype=like.dtype, shape=like.shape, name=like.name)


def export_streamed(streamed: StreamedModel, path: Path, cfg: Export) -> Path:
    """`export_fp32` of a streamed model: the same graph and the same initializer bytes as the whole
    model's export, written with one block in memory.

    Raises:
        RuntimeError: an initializer holding a placeholder is not a block weight by name (an exporter
            change: a bug, not user error).
    """
    with _placeholders(streamed.model) as stand_ins:
        program = export_program(streamed.model, cfg, streamed.spec)
        stood_in = {n: p.data_ptr() for n, p in streamed.model.named_parameters() if id(p) in stand_ins}
    params = BlockParameters(streamed)
    placeholder_storage = set(stood_in.values())
    for value in program.model.graph.initializers.values():
        raw = getattr(value.const_value, "raw", None)
        if not isinstance(raw, torch.Tensor):
            continue
        name = value.name.removeprefix(f"{WRAPPED}.")
        if name in stood_in:
            value.const_value = _lazy_parameter(lambda name=name: params(name), value.const_value)
        elif raw.data_ptr() in placeholder_storage:
            raise RuntimeError(f"initializer {value.name} holds a placeholder and names no block weight")
    try:
        save_program(program, path, cfg)
    finally:
        params.release()
    return path
