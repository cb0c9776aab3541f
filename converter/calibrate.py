"""Stage *calibrate*: per-channel abs-max of the inputs of the linears that will be quantized.

Forward pre-hooks fold each batch into a running maximum, so memory does not grow with the number
of calibration samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from converter.data import Windows
from converter.errors import UserError
from converter.progress import track


class _HeadReached(Exception):
    """Raised by the head's hook to skip computing logits nobody reads."""


@dataclass
class ActStats:
    """Per-channel input abs-max for each hooked linear: name -> (in_features,) float32."""

    amax: dict[str, torch.Tensor]
    batches: int
    tokens: int

    def per_tensor(self, name: str) -> float:
        return float(self.amax[name].max())


@torch.no_grad()
def collect_input_amax(
    model: torch.nn.Module,
    names: list[str],
    windows: Windows,
    batch_size: int,
    description: str = "calibrate",
) -> ActStats:
    """Run the calibration windows through `model` and record per-channel input abs-max.

    The head (the lm_head of a causal LM, a fifth of a 135M decoder's FLOPs and a 50 MB logits tensor
    per 256-token window) never runs: when it is hooked, the forward pass stops once its input is
    recorded.

    Raises:
        UserError: a linear saw a non-finite activation, or never ran.
    """
    amax: dict[str, torch.Tensor] = {}
    head = {n for n, _ in model.named_modules() if n and not n.startswith(model.base_model_prefix)}

    def make_hook(name: str):
        def hook(_module, args):
            x = args[0].detach()
            batch_max = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            prev = amax.get(name)
            amax[name] = batch_max if prev is None else torch.maximum(prev, batch_max)
            if name in head:  # the head runs last: its input is all we need, not the logits
                raise _HeadReached

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    runner = model if head & set(names) else model.base_model
    batches = tokens = 0
    try:
        total = math.ceil(len(windows.input_ids) / batch_size)
        for ids, mask in track(windows.batches(batch_size), description, total=total):
            try:
                runner(input_ids=ids, attention_mask=mask, use_cache=False)
            except _HeadReached:
                pass
            batches += 1
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    for name in names:
        if name not in amax:
            raise UserError(f"layer {name}: never ran during calibration")
        if not torch.isfinite(amax[name]).all():
            raise UserError(
                f"layer {name}: activation amax is not finite after {batches} calibration batches"
            )
    return ActStats(amax=amax, batches=batches, tokens=tokens)
