"""Model kinds: what a decoder and an encoder export (inputs, outputs), and encoder parity metrics.

A causal LM exports `logits` from `(input_ids, attention_mask)`. An encoder exports its table entry's
output (`last_hidden_state` for a bare encoder, `logits` for a classification head) and also takes
`token_type_ids` when its config has more than one segment type, as HF tokenizers produce for BERT.
Every consumer of input/output names (export, runners, parity, manifest) asks `model_io`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from converter.models.archs import ArchSpec
from converter.models.text import Windows
from converter.progress import track


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


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C), (B, T) -> (B, C): mean over the tokens the mask keeps (sentence-transformers pooling)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class EncoderAccumulator:
    """Cosine of mean-pooled embeddings (bare encoder) or of logits plus top-1 (classification head):
    one value per window, or per unmasked token for a token-classification head (logits (B, T, L))."""

    def __init__(self, output: str):
        self.output = output
        self.cosines: list[float] = []
        self.top1 = 0
        self.tokens = 0
        self.per_token = False

    def add(self, mask: torch.Tensor, ref: torch.Tensor, cand: torch.Tensor) -> None:
        ref, cand = ref.double(), cand.double()
        if self.output == "last_hidden_state":
            ref, cand = mean_pool(ref, mask), mean_pool(cand, mask)
        else:
            if ref.dim() == 3:  # token classification: compare the tokens the mask keeps, not padding
                self.per_token = True
                keep = mask.bool()
                ref, cand = ref[keep], cand[keep]
            self.top1 += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        self.cosines += F.cosine_similarity(ref, cand, dim=-1).tolist()
        self.tokens += int(mask.sum())

    def metrics(self, windows: int):
        from converter.parity.metrics import ParityMetrics

        pooled = self.output == "last_hidden_state"
        return ParityMetrics(
            windows=windows, tokens=self.tokens, reference_ppl=None, candidate_ppl=None, ppl_ratio=None,
            mean_cosine=sum(self.cosines) / len(self.cosines), min_cosine=min(self.cosines),
            top1_agreement=None if pooled else self.top1 / len(self.cosines), kl_mean=None,
            compared="mean-pooled embedding" if pooled else "per-token logits" if self.per_token else "logits",
        )


def evaluate_encoder(reference, candidate, windows: Windows, batch_size: int, io: ModelIO):
    """Run both runners on every evaluation window; per-window cosine (and top-1 for a classifier)."""
    acc = EncoderAccumulator(io.output)
    total = math.ceil(len(windows.input_ids) / batch_size)
    with reference, candidate:
        for ids, mask in track(windows.batches(batch_size), "evaluate", total=total):
            feed = io.feed(ids, mask)
            ref = torch.from_numpy(np.asarray(reference.infer(feed)[io.output]))
            cand = torch.from_numpy(np.asarray(candidate.infer(feed)[io.output]))
            acc.add(mask, ref, cand)
    return acc.metrics(len(windows.input_ids))


def checkpoint_io(folder, layer_map=None) -> ModelIO:
    """`model_io` of a checkpoint folder, from its config.json alone (no weights loaded).

    Args:
        layer_map: a recipe-supplied `ArchSpec` for a class that is not in the table.
    """
    from transformers import AutoConfig

    from converter.models.archs import spec_for

    config = AutoConfig.from_pretrained(folder)
    return model_io(spec_for((config.architectures or [""])[0], layer_map), config)
