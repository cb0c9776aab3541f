"""Block-sequential passes over a model read one block at a time (converter/models/lazy.py):
calibration (the per-channel input abs-max of `calibrate`), smoothing and the quantization plan, and
parity's FP32 references (logits, greedy tokens). Each equals the whole model's pass.

The calibration windows are embedded once and the first block's call is recorded (its keyword
arguments: masks, rotary tables, positions; the same for every block of a model whose layers are of
one kind). Then each block in turn is read from the checkpoint, runs every window, has its linears'
inputs recorded, and hands its float outputs on as the next block's inputs (the pattern of GPTQ's and
llm-compressor's layer loops). The head's input is the final norm of the last block's outputs.

Decode-step calibration (converter/quant/decode_steps.py) records the activations of the model's own
greedy tokens. Here the greedy continuations are produced first, one block-streamed step at a time
through a KV cache, and then calibrated as prefill tokens: in float a token's activations are the
same in a decode step and in a prefill (causal attention), and the window's prefix, recorded again,
cannot move an abs-max the full-window pass already holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from converter.errors import UserError
from converter.models.lazy import StreamedModel
from converter.models.text import Windows, length_batches
from converter.progress import track
from converter.quant.calibrate import ActStats, checked_stats, record_amax
from converter.quant.quantize import LinearQuant, QuantPlan, plan_embedding, plan_quantization
from converter.quant.smooth import SmoothReport, smooth

if TYPE_CHECKING:  # annotations only: the recipe sits above the stages
    from converter.recipe import Quantization, Smoothing


class _FirstBlockReached(Exception):
    """Raised by the first block's hook: what comes after needs weights that are not read yet."""


def _first_block_call(streamed: StreamedModel, ids: torch.Tensor, mask: torch.Tensor, cache=None) -> tuple[tuple, dict]:
    """The first block's (positional, keyword) arguments for one batch (with `cache`: a step through it)."""
    calls: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _FirstBlockReached

    handle = streamed.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        streamed.model.base_model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=cache is not None)
    except _FirstBlockReached:
        pass
    finally:
        handle.remove()
    return calls[0]


@torch.no_grad()
def first_block_calls(streamed: StreamedModel, windows: Windows, batch_size: int) -> list[tuple[tuple, dict]]:
    """The first block's (positional, keyword) arguments for each batch of `windows`."""
    return [_first_block_call(streamed, ids, mask) for ids, mask in windows.batches(batch_size)]


def block_outputs(block, calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """The block's output hidden states for each replayed (positional, keyword) call."""
    outputs = []
    for args, kwargs in calls:
        out = block(*args, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def _with_hidden(call: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden(call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def greedy_continuations(streamed: StreamedModel, prefixes: torch.Tensor, steps: int, batch_size: int,
                         description: str = "decode steps") -> torch.Tensor:
    """(N, steps): each prefix's greedy continuation, one token per step through a KV cache per
    batch; every step reads each block once for all batches."""
    return torch.cat(_greedy(streamed, list(torch.split(prefixes, batch_size)), steps, description))


@torch.no_grad()
def greedy_many(streamed: StreamedModel, prompts: list[list[int]], steps: int, batch_size: int,
                description: str = "reference generation") -> list[list[int]]:
    """`greedy_torch_many` of the parity stage, block-streamed: each prompt's greedy tokens, prompts of
    one length batched (no padding, so each row computes what it would alone), every length's
    batches stepped together so that a step reads each block once."""
    groups = length_batches(prompts, batch_size)
    tokens = _greedy(streamed, [torch.tensor([prompts[i] for i in rows], dtype=torch.int64) for rows in groups],
                     steps, description)
    out: list[list[int]] = [[] for _ in prompts]
    for rows, got in zip(groups, tokens):
        for i, row in zip(rows, got.tolist()):
            out[i] = row
    return out


def _greedy(streamed: StreamedModel, batches: list[torch.Tensor], steps: int, description: str) -> list[torch.Tensor]:
    """Each batch's (rows, steps) greedy tokens; the batches may differ in length."""
    from transformers import DynamicCache

    caches = [DynamicCache(config=streamed.model.config) for _ in batches]
    feeds, tokens = batches, [[] for _ in batches]
    for _ in track(range(steps), description, total=steps):
        calls = [_first_block_call(streamed, feed, torch.ones(len(feed), cache.get_seq_length() + feed.shape[1],
                                                              dtype=torch.int64), cache)
                 for feed, cache in zip(feeds, caches)]
        finals = _through_blocks(streamed, calls)
        logits = _around_blocks(streamed, [(feed, torch.ones_like(feed)) for feed in feeds], finals)
        feeds = [step[:, -1:].argmax(-1) for step in logits]
        for got, nxt in zip(tokens, feeds):
            got.append(nxt)
    return [torch.cat(got, dim=1) for got in tokens]


@torch.no_grad()
def collect_input_amax_streamed(streamed: StreamedModel, names: list[str], windows: Windows, batch_size: int,
                                description: str = "calibrate") -> ActStats:
    """Per-channel input abs-max of the linears in `names` (full module names), computed block by block.

    Equal to `collect_input_amax` on the whole model loaded in fp32 from the same checkpoint (with
    decode steps: to float rounding, a decode step's sums being ordered as a prefill's are not).

    Raises:
        UserError: a head whose input is not a known final norm, or a linear that saw a non-finite
            activation or never ran.
    """
    spec = streamed.spec
    inside = spec.blocks + "."
    head = [n for n in names if not n.startswith(inside)]
    if head and (spec.head_group is None or set(head) - set(spec.head_group.balance)):
        raise UserError(f"layers {', '.join(head)}: outside the blocks, and their input is not a final norm the "
                        "architecture table names; block streaming cannot calibrate them")
    amax: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        return lambda _module, args: record_amax(amax, name, args[0].detach())

    tokens = sum(ids.numel() for ids, _ in windows.batches(batch_size))
    batches = len(range(0, len(windows.input_ids), batch_size))
    if windows.decode_steps and windows.decode_windows:
        # the decode windows' prefixes, continued by the model's own greedy tokens: calibrated as prefill
        steps, width = windows.decode_steps, windows.input_ids.shape[1]
        prefixes = windows.input_ids[: windows.decode_windows, : width - steps]
        continued = torch.cat([prefixes, greedy_continuations(streamed, prefixes, steps, batch_size)], dim=1)
        windows = Windows(torch.cat([windows.input_ids, continued]), windows.sha256, windows.total_windows)
        tokens += continued.shape[0] * steps
    calls = first_block_calls(streamed, windows, batch_size)
    for index in track(range(len(streamed.blocks)), description, total=len(streamed.blocks)):
        prefix = streamed.block_prefix(index)
        block = streamed.materialize(prefix)
        mine = [n for n in names if n.startswith(prefix + ".")]
        handles = [streamed.model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in mine]
        try:
            outputs = block_outputs(block, calls)
        finally:
            for h in handles:
                h.remove()
            streamed.release(prefix)
        calls = [_with_hidden(call, hidden) for call, hidden in zip(calls, outputs)]
    if head:
        norm = streamed.model.get_submodule(spec.head_group.prev)
        for call in calls:
            normed = norm(_hidden(call))
            for name in head:
                record_amax(amax, name, normed)
    return checked_stats(amax, names, batches, tokens)


def _block_names(streamed: StreamedModel, names: list[str]) -> dict[str | None, list[str]]:
    """`names` by the block that holds them (None: outside the blocks), in model order."""
    out: dict[str | None, list[str]] = {}
    for name in names:
        out.setdefault(streamed.block_of(name), []).append(name)
    return out


@torch.no_grad()
def smooth_streamed(streamed: StreamedModel, act_amax: dict[str, torch.Tensor], cfg: Smoothing,
                    alphas: dict[str, float] | None = None) -> SmoothReport:
    """`smooth` on a block-streamed model: the head group now (its weights stay in memory), and each
    block's groups every time the block is read (`StreamedModel.prepare`), so every later pass
    (re-calibration, the plan, the export) reads the block smoothed. Smoothing is a function of the
    stored weights and the statistics, so each read smooths a block the same way. One pass over the
    blocks gives the report, in `smooth`'s order (blocks, then the head).
    """
    spec, inside = streamed.spec, streamed.spec.blocks + "."

    def smooth_block(prefix: str, _module: torch.nn.Module) -> SmoothReport:
        return smooth(streamed.model, act_amax, cfg, spec, alphas, where=lambda key: key.startswith(prefix + "."))

    if streamed.prepare is not None:
        raise RuntimeError("the streamed model is prepared already (smoothed twice?)")
    report = SmoothReport(groups=[], skipped=[])
    for index in track(range(len(streamed.blocks)), "smooth", total=len(streamed.blocks)):
        prefix = streamed.block_prefix(index)
        try:
            part = smooth_block(prefix, streamed.materialize(prefix))
        finally:
            streamed.release(prefix)
        report.groups += part.groups
        report.skipped += part.skipped
    head = smooth(streamed.model, act_amax, cfg, spec, alphas, where=lambda key: not key.startswith(inside))
    report.groups += head.groups
    report.skipped += head.skipped
    streamed.prepare = smooth_block
    return report


@torch.no_grad()
def plan_streamed(streamed: StreamedModel, names: list[str], act_ranges: dict[str, float],
                  cfg: Quantization) -> QuantPlan:
    """`plan_quantization` on a block-streamed model: each block's weight scales with the block read
    (and prepared: smoothed) once; the embedding and the head from the weights kept in memory."""
    linears: dict[str, LinearQuant] = {}
    excluded: list[str] = []
    per_block = cfg.model_copy(update={"embedding": "float"})
    by_block = _block_names(streamed, names)
    for prefix, block_names in track(list(by_block.items()), "quantize", total=len(by_block)):
        if prefix is None:  # the head: its weights stay in memory
            part = plan_quantization(streamed.model, block_names, act_ranges, per_block)
        else:
            try:
                streamed.materialize(prefix)
                part = plan_quantization(streamed.model, block_names, act_ranges, per_block)
            finally:
                streamed.release(prefix)
        linears.update(part.linears)
        excluded += part.excluded
    embedding = plan_embedding(streamed.model) if cfg.embedding == "int8" else None
    return QuantPlan(linears=linears, excluded=excluded, embedding=embedding)


class _Replay(torch.nn.Module):
    """Stands in for every block while the model's own forward runs around them: returns what the
    last block returned for the current batch (its inputs are ignored)."""

    def __init__(self):
        super().__init__()
        self.output = None

    def forward(self, *_args, **_kwargs):
        return self.output


def _through_blocks(streamed: StreamedModel, calls: list[tuple[tuple, dict]], description: str | None = None) -> list:
    """Each call run through every block in turn, each block read once; what the last block returned."""
    last = len(streamed.blocks) - 1
    indices = range(len(streamed.blocks))
    finals = []
    for index in track(indices, description, total=len(indices)) if description else indices:
        prefix = streamed.block_prefix(index)
        try:
            block = streamed.materialize(prefix)
            if index < last:
                calls = [_with_hidden(call, hidden) for call, hidden in zip(calls, block_outputs(block, calls))]
            else:
                finals = [block(*args, **kwargs) for args, kwargs in calls]
        finally:
            streamed.release(prefix)
    return finals


def _around_blocks(streamed: StreamedModel, batches: list[tuple[torch.Tensor, torch.Tensor]], finals: list) -> list[torch.Tensor]:
    """The logits of each batch whose last block returned `finals`: the model's own forward (embedding
    scale, position embeddings, final norm, projections, head, logit scaling or soft-capping) with
    the blocks replaced by the replay of those outputs."""
    parent_path, _, attr = streamed.spec.blocks.rpartition(".")
    parent = streamed.model.get_submodule(parent_path)
    replay = _Replay()
    setattr(parent, attr, torch.nn.ModuleList([replay] * len(streamed.blocks)))
    try:
        out = []
        for (ids, mask), final in zip(batches, finals, strict=True):
            replay.output = final
            out.append(streamed.model(input_ids=ids, attention_mask=mask, use_cache=False).logits)
        return out
    finally:
        setattr(parent, attr, streamed.blocks)


@torch.no_grad()
def streamed_logits(streamed: StreamedModel, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    description: str = "reference logits") -> list[torch.Tensor]:
    """The model's logits for each (input_ids, attention_mask) batch, block by block: each block is
    read once for all batches (the FP32 reference of parity, for a model that is not held whole)."""
    calls = [_first_block_call(streamed, ids, mask) for ids, mask in batches]
    return _around_blocks(streamed, batches, _through_blocks(streamed, calls, description))


def streamed_batch_logits(streamed: StreamedModel, batch_size: int):
    """sequences -> each one's logits (T, V) as float32 numpy, block-streamed: sequences of one length
    batched (no padding), all batches through each block in one pass (parity's stepwise agreement)."""
    @torch.no_grad()
    def logits_of(sequences: list[list[int]]) -> list:
        groups = length_batches(sequences, batch_size)
        batches = []
        for rows in groups:
            ids = torch.tensor([sequences[i] for i in rows], dtype=torch.int64)
            batches.append((ids, torch.ones_like(ids)))
        out: list = [None] * len(sequences)
        for rows, logits in zip(groups, streamed_logits(streamed, batches, "stepwise logits")):
            for i, row in zip(rows, logits.float().numpy()):
                out[i] = row
        return out
    return logits_of
