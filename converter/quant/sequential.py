"""Block-sequential calibration: the per-channel input abs-max of `calibrate`, one block in memory.

The calibration windows are embedded once and the first block's call is recorded (its keyword
arguments: masks, rotary tables, positions; the same for every block of a model whose layers are of
one kind). Then each block in turn is read from the checkpoint, runs every window, has its linears'
inputs recorded, and hands its float outputs on as the next block's inputs (the pattern of GPTQ's and
llm-compressor's layer loops). The head's input is the final norm of the last block's outputs.
"""

from __future__ import annotations

import torch

from converter.errors import UserError
from converter.models.lazy import StreamedModel
from converter.models.text import Windows
from converter.progress import track
from converter.quant.calibrate import ActStats


class _FirstBlockReached(Exception):
    """Raised by the first block's hook: what comes after needs weights that are not read yet."""


@torch.no_grad()
def first_block_calls(streamed: StreamedModel, windows: Windows, batch_size: int) -> list[tuple[tuple, dict]]:
    """The first block's (positional, keyword) arguments for each batch of `windows`."""
    calls: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _FirstBlockReached

    handle = streamed.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids, mask in windows.batches(batch_size):
            try:
                streamed.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _FirstBlockReached:
                pass
    finally:
        handle.remove()
    return calls


def _with_hidden(call: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def collect_input_amax_streamed(streamed: StreamedModel, names: list[str], windows: Windows, batch_size: int,
                                description: str = "calibrate") -> ActStats:
    """Per-channel input abs-max of the linears in `names` (full module names), computed block by block.

    Equal to `collect_input_amax` on the whole model loaded in fp32 from the same checkpoint.

    Raises:
        UserError: decode-step calibration asked for, a head whose input is not a known final norm,
            or a linear that saw a non-finite activation or never ran.
    """
    if windows.decode_steps and windows.decode_windows:
        raise UserError("calibration.decode_steps: decode-step calibration is not block-streamed yet; "
                        "set calibration.decode_steps: 0 for a streamed conversion")
    spec = streamed.spec
    inside = spec.blocks + "."
    head = [n for n in names if not n.startswith(inside)]
    if head and (spec.head_group is None or set(head) - set(spec.head_group.balance)):
        raise UserError(f"layers {', '.join(head)}: outside the blocks, and their input is not a final norm the "
                        "architecture table names; block streaming cannot calibrate them")
    amax: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        batch_max = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        prev = amax.get(name)
        amax[name] = batch_max if prev is None else torch.maximum(prev, batch_max)

    def make_hook(name: str):
        return lambda _module, args: record(name, args[0].detach())

    calls = first_block_calls(streamed, windows, batch_size)
    tokens = sum(ids.numel() for ids, _ in windows.batches(batch_size))
    for index in track(range(len(streamed.blocks)), description, total=len(streamed.blocks)):
        prefix = streamed.block_prefix(index)
        block = streamed.materialize(prefix)
        mine = [n for n in names if n.startswith(prefix + ".")]
        handles = [streamed.model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in mine]
        try:
            outputs = []
            for args, kwargs in calls:
                out = block(*args, **kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
        finally:
            for h in handles:
                h.remove()
            streamed.release(prefix)
        calls = [_with_hidden(call, hidden) for call, hidden in zip(calls, outputs)]
    if head:
        norm = streamed.model.get_submodule(spec.head_group.prev)
        for args, kwargs in calls:
            normed = norm(args[0] if args else kwargs["hidden_states"])
            for name in head:
                record(name, normed)
    for name in names:
        if name not in amax:
            raise UserError(f"layer {name}: never ran during calibration")
        if not torch.isfinite(amax[name]).all():
            raise UserError(f"layer {name}: activation amax is not finite after {len(calls)} calibration batches")
    return ActStats(amax=amax, batches=len(calls), tokens=tokens)

