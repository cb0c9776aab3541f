"""Encoder parity: cosine of mean-pooled embeddings (bare encoder) or of logits plus top-1 (a
classification head), per evaluation window; the encoder counterpart of `metrics.evaluate`."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from converter.models.io import ModelIO
from converter.models.text import Windows
from converter.parity.metrics import ParityMetrics
from converter.progress import track


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
