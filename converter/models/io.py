"""Model kinds: what a decoder and an encoder export (inputs, outputs).

A causal LM exports `logits` from `(input_ids, attention_mask)`. An encoder exports its table entry's
output (`last_hidden_state` for a bare encoder, `logits` for a classification head) and also takes
`token_type_ids` when its config has more than one segment type, as HF tokenizers produce for BERT.
Every consumer of input/output names (export, runners, parity, manifest) asks `model_io`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from converter.models.archs import ArchSpec


@dataclass(frozen=True)
class ModelIO:
    kind: str  # "decoder" | "encoder"
    inputs: tuple[str, ...]
    output: str

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.output,)

    def feed(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
        """The graph's input dict for a batch of windows (segment ids are all 0: one segment)."""
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        return feed

    def forward_kwargs(self) -> dict:
        """Extra keyword arguments of the HF forward call (decoders: no KV cache)."""
        return {"use_cache": False} if self.kind == "decoder" else {}


def model_io(spec: ArchSpec, config) -> ModelIO:
    """Input and output names of the exported graph for a model of this table entry and config."""
    inputs = ("input_ids", "attention_mask")
    if spec.kind == "encoder" and (getattr(config, "type_vocab_size", 0) or 0) > 1:
        inputs += ("token_type_ids",)
    return ModelIO(spec.kind, inputs, spec.output)


class OutputOf(torch.nn.Module):
    """Export wrapper: positional graph inputs in, one named model output out."""

    def __init__(self, model: torch.nn.Module, io: ModelIO):
        super().__init__()
        self.model = model
        self.io = io

    def forward(self, *inputs):
        kwargs = dict(zip(self.io.inputs, inputs))
        return getattr(self.model(**kwargs, **self.io.forward_kwargs()), self.io.output)


def checkpoint_io(folder, layer_map=None) -> ModelIO:
    """`model_io` of a checkpoint folder, from its config.json alone (no weights loaded).

    Args:
        layer_map: a recipe-supplied `ArchSpec` for a class that is not in the table.
    """
    from transformers import AutoConfig

    from converter.models.archs import spec_for

    config = AutoConfig.from_pretrained(folder)
    return model_io(spec_for((config.architectures or [""])[0], layer_map), config)
