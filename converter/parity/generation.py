"""Greedy generation: over any runner of an ONNX graph (with or without a KV cache) and over PyTorch.

Generation parity compares the tokens the FP32 original (PyTorch) and the INT8 artifact generate
greedily from the same prompts. Definitions (per prompt, N new tokens, EOS ignored so both sides
always produce N tokens):
  * token agreement = (positions i < N where both generated the same token) / N. Positions after a
    divergence still count when the two continuations line up again token for token (e.g. a
    different word of the same token length); they are not counted as mismatches by fiat.
  * prefix agreement = first divergence / N: the strict reading, where everything after the first
    different token counts as wrong.
  * first divergence = the index of the first different token, or N when all N agree.
  * stepwise agreement = (steps i < N where the candidate, fed the prompt and the reference's own
    first i tokens, picks the reference's token i) / N. Each step is judged on the same context, so
    one flipped near-tie costs one step, not every step after it as in the two rates above.
The reported rates are means over prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from converter.export.kv_graph import KvLayout, past_names, prefill_feed, present_names
from converter.models.text import length_batches, text_ids
from converter.quant.sequential import greedy_many, streamed_batch_logits

Step = Callable[[dict], dict]  # feed dict -> {"logits", "present.*"}: a runner's infer, or an ORT session


def greedy_graph(step: Step, layout: KvLayout | None, prompt: list[int], max_new_tokens: int,
                 eos_token_id: int | None = None) -> Iterator[int]:
    """Yield greedy tokens one by one from an exported graph (batch 1).

    With a KV layout: one prefill with empty past tensors, then one-token decode steps that feed the
    returned `present.*` back as `past_key_values.*`. Without (a logits-only graph): the whole
    sequence is re-run for every token.
    """
    ids = list(prompt)
    past = None
    for _ in range(max_new_tokens):
        if layout is None or past is None:
            out = step(_whole_sequence_feed(ids, layout))
        else:
            out = step({"input_ids": np.array([[ids[-1]]], dtype=np.int64),
                        "attention_mask": np.ones((1, len(ids)), dtype=np.int64), **past})
        if layout is not None:
            past = {p: out[q] for p, q in zip(past_names(layout.num_layers), present_names(layout.num_layers))}
        token = int(np.asarray(out["logits"])[0, -1].argmax())
        ids.append(token)
        yield token
        if eos_token_id is not None and token == eos_token_id:
            return


def greedy_graph_batch(step: Step, layout: KvLayout | None, prompts: list[list[int]],
                       max_new_tokens: int) -> list[list[int]]:
    """`greedy_graph` for prompts of one length, all rows in one batch (EOS ignored): no padding, so
    each row sees what it would alone (the int8 kernels sum integer products exactly; a float
    reduction may still differ in its last bits from batch 1, as in any batched decode).
    """
    assert len({len(p) for p in prompts}) == 1, "one prompt length per batch"  # internal: see greedy_graph_many
    ids = np.array(prompts, dtype=np.int64)  # (B, P + generated)
    past = None
    for _ in range(max_new_tokens):
        if layout is None or past is None:
            out = step(_whole_sequence_feed(ids, layout))
        else:
            out = step({"input_ids": ids[:, -1:], "attention_mask": np.ones(ids.shape, dtype=np.int64), **past})
        if layout is not None:
            past = {p: out[q] for p, q in zip(past_names(layout.num_layers), present_names(layout.num_layers))}
        ids = np.concatenate([ids, np.asarray(out["logits"])[:, -1].argmax(-1)[:, None].astype(np.int64)], axis=1)
    return ids[:, len(prompts[0]):].tolist()


def greedy_graph_many(step: Step, layout: KvLayout | None, prompts: list[list[int]], max_new_tokens: int,
                      max_batch: int | None = None) -> list[list[int]]:
    """`greedy_graph` for every prompt, batched by prompt length in batches of at most `max_batch`
    rows (None: no limit; a TensorRT engine's profile sets one)."""
    out: list[list[int]] = [[] for _ in prompts]
    for rows in length_batches(prompts, max_batch):
        for i, tokens in zip(rows, greedy_graph_batch(step, layout, [prompts[i] for i in rows], max_new_tokens)):
            out[i] = tokens
    return out


def _whole_sequence_feed(ids, layout: KvLayout | None) -> dict:
    """A feed that runs all of `ids` (one row, or a (B, T) array) at once: a prefill with empty past
    tensors on a KV graph."""
    x = np.array(ids, dtype=np.int64).reshape(-1, np.shape(ids)[-1])
    mask = np.ones_like(x)
    return {"input_ids": x, "attention_mask": mask} if layout is None else prefill_feed(x, mask, layout)


def sequence_logits(step: Step, layout: KvLayout | None, ids: list[int]) -> np.ndarray:
    """Logits (T, V) of one pass of a graph over `ids` (batch 1)."""
    return np.asarray(step(_whole_sequence_feed(ids, layout))["logits"])[0]


def batch_logits(step: Step, layout: KvLayout | None, max_batch: int | None = None):
    """A `stepwise_agreement` logits function that runs sequences of one length together, in batches of at
    most `max_batch` rows: [ids (T,), ...] -> [logits (T, V), ...]."""
    def logits_of(sequences: list[list[int]]) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.empty(0)] * len(sequences)
        for rows in length_batches(sequences, max_batch):
            logits = np.asarray(step(_whole_sequence_feed([sequences[i] for i in rows], layout))["logits"])
            for i, row in zip(rows, logits):
                out[i] = row
        return out
    return logits_of


def stepwise_agreement(logits_of: Callable[[list[int]], np.ndarray], prompts: list[list[int]],
                       reference: list[list[int]], batched: Callable[[list[list[int]]], list[np.ndarray]] | None = None
                       ) -> float:
    """Mean over prompts of the steps where the candidate, fed the prompt and the reference's tokens
    before the step, picks the reference's token (see the module docstring).

    Args:
        logits_of: token ids (T,) -> the candidate's logits (T, V), one causal pass.
        reference: the reference's greedy continuation of each prompt.
        batched: optional, instead of `logits_of`: every sequence's logits at once (`batch_logits`).
    """
    if batched is not None:
        sequences = [list(p) + list(t[:-1]) for p, t in zip(prompts, reference, strict=True)]
        picks = [logits[len(p) - 1:].argmax(-1) for p, logits in zip(prompts, batched(sequences))]
    else:
        picks = [stepwise_picks(logits_of, prompt, tokens) for prompt, tokens in zip(prompts, reference, strict=True)]
    return float(np.mean([float(np.mean(p == np.asarray(t))) for p, t in zip(picks, reference, strict=True)]))


def stepwise_picks(logits_of: Callable[[list[int]], np.ndarray], prompt: list[int], tokens: list[int]) -> np.ndarray:
    """The candidate's pick at each of the N steps, fed the prompt and `tokens[:i]`: one causal pass
    over prompt + tokens[:-1], whose position P - 1 + i predicts token i. (N,) int."""
    logits = logits_of(list(prompt) + list(tokens[:-1]))  # (P + N - 1, V)
    return logits[len(prompt) - 1:].argmax(-1)


@torch.no_grad()
def greedy_torch(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of an HF causal LM with its own KV cache (batch 1, EOS ignored)."""
    return greedy_torch_batch(model, [prompt], max_new_tokens)[0]


@torch.no_grad()
def greedy_torch_batch(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of an HF causal LM for prompts of one length, all in one batch (EOS ignored):
    no padding, so each row computes what it would alone."""
    from transformers import DynamicCache

    assert len({len(p) for p in prompts}) == 1, "one prompt length per batch"  # internal: see greedy_torch_many
    cache = DynamicCache(config=model.config)
    x = torch.tensor(prompts, dtype=torch.int64)  # (B, P), then (B, 1)
    tokens = []
    for _ in range(max_new_tokens):
        seen = cache.get_seq_length() + x.shape[1]
        out = model(input_ids=x, attention_mask=torch.ones(len(prompts), seen, dtype=torch.int64),
                    past_key_values=cache, use_cache=True)
        x = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(x[:, 0].tolist())
    return [list(row) for row in zip(*tokens)]


def greedy_torch_many(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """`greedy_torch` for every prompt, batched by prompt length (evaluation-window prompts share one)."""
    out: list[list[int]] = [[] for _ in prompts]
    for rows in length_batches(prompts, None):
        for i, tokens in zip(rows, greedy_torch_batch(model, [prompts[i] for i in rows], max_new_tokens)):
            out[i] = tokens
    return out


def torch_logits(model: torch.nn.Module) -> Callable[[list[int]], np.ndarray]:
    """token ids (T,) -> the model's logits (T, V) as float32, one causal pass (for `stepwise_agreement`)."""
    @torch.no_grad()
    def logits_of(ids: list[int]) -> np.ndarray:
        out = model(input_ids=torch.tensor([ids], dtype=torch.int64), use_cache=False)
        return out.logits[0].float().numpy()
    return logits_of


def torch_batch_logits(model: torch.nn.Module) -> Callable[[list[list[int]]], list[np.ndarray]]:
    """`torch_logits` for many sequences, those of one length in one batch (no padding)."""
    @torch.no_grad()
    def logits_of(sequences: list[list[int]]) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.empty(0)] * len(sequences)
        for rows in length_batches(sequences, None):
            x = torch.tensor([sequences[i] for i in rows], dtype=torch.int64)
            logits = model(input_ids=x, use_cache=False).logits.float().numpy()
            for i, row in zip(rows, logits):
                out[i] = row
        return out
    return logits_of


def yardstick(model: torch.nn.Module, prompts: list[list[int]], reference: list[list[int]]) -> dict:
    """How closely another precision of the reference (e.g. the checkpoint in bfloat16) follows FP32's
    greedy tokens `reference` on the same prompts: the rates GenerationMetrics reports for the artifact."""
    tokens = greedy_torch_many(model, prompts, len(reference[0]))
    return _yardstick(next(model.parameters()).dtype, tokens, prompts, reference, torch_batch_logits(model))


def yardstick_streamed(streamed, prompts: list[list[int]], reference: list[list[int]], batch_size: int) -> dict:
    """`yardstick` of a block-streamed model (converter/models/lazy.py, built with the yardstick's dtype)."""
    tokens = greedy_many(streamed, prompts, len(reference[0]), batch_size, "yardstick generation")
    return _yardstick(streamed.dtype, tokens, prompts, reference, streamed_batch_logits(streamed, batch_size))


def _yardstick(dtype: torch.dtype, tokens: list[list[int]], prompts: list[list[int]], reference: list[list[int]],
               batched: Callable[[list[list[int]]], list[np.ndarray]]) -> dict:
    metrics = compare_tokens(reference, tokens, len(prompts[0]))
    return {"dtype": str(dtype).removeprefix("torch."),
            "token_agreement": metrics.token_agreement, "prefix_agreement": metrics.prefix_agreement,
            "stepwise_agreement": stepwise_agreement(None, prompts, reference, batched=batched), "tokens": tokens}


def session_step(session) -> Step:
    """An ONNX Runtime session as a `Step`."""
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(None, feed)))


@dataclass
class GenerationMetrics:
    prompts: int
    prompt_tokens: int
    new_tokens: int
    token_agreement: float  # mean over prompts of matching positions / N
    prefix_agreement: float  # mean over prompts of first divergence / N
    stepwise_agreement: float | None = None  # mean over prompts of steps matched in the reference's context
    yardstick: dict | None = None  # the same rates for the reference in another precision (`yardstick`)
    first_divergence: list[int] = field(default_factory=list)  # per prompt; N = no divergence
    reference_tokens: list[list[int]] = field(default_factory=list)
    candidate_tokens: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def compare_tokens(reference: list[list[int]], candidate: list[list[int]], prompt_tokens: int) -> GenerationMetrics:
    """Agreement of two sets of greedy continuations (see the module docstring for definitions)."""
    agree, prefix, first = [], [], []
    for ref, cand in zip(reference, candidate, strict=True):
        n = len(ref)
        same = [a == b for a, b in zip(ref, cand, strict=True)]
        diverge = same.index(False) if False in same else n
        agree.append(sum(same) / n)
        prefix.append(diverge / n)
        first.append(diverge)
    return GenerationMetrics(prompts=len(reference), prompt_tokens=prompt_tokens,
                             new_tokens=len(reference[0]) if reference else 0,
                             token_agreement=float(np.mean(agree)), prefix_agreement=float(np.mean(prefix)),
                             first_divergence=first, reference_tokens=reference, candidate_tokens=candidate)


def generation_parity(reference_model: torch.nn.Module, candidate_step: Step, layout: KvLayout | None,
                      prompts: list[list[int]], max_new_tokens: int, max_batch: int | None = None) -> GenerationMetrics:
    """Greedy-generate from every prompt with the PyTorch reference and the candidate graph, prompts of one
    length batched (at most `max_batch` rows per candidate call; None: no limit)."""
    reference = greedy_torch_many(reference_model, prompts, max_new_tokens)
    candidate = greedy_graph_many(candidate_step, layout, prompts, max_new_tokens, max_batch)
    metrics = compare_tokens(reference, candidate, len(prompts[0]) if prompts else 0)
    if prompts:
        metrics.stepwise_agreement = stepwise_agreement(None, prompts, reference,
                                                        batched=batch_logits(candidate_step, layout, max_batch))
    return metrics


def chat_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as one user message in the tokenizer's chat template, ready for the reply."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in recent transformers


def generation_prompts(windows, cfg, tokenizer, base_dir: Path) -> list[list[int]]:
    """Prompt token ids: the first `cfg.prompt_tokens` of the first `cfg.prompts` evaluation windows,
    or the lines of `cfg.prompts_file` (resolved against `base_dir`): each after the tokenizer's BOS
    (if it puts one before every text), or wrapped in the chat template with `cfg.chat_template`.

    Raises:
        UserError: the prompts file is missing or has no non-empty line, or a chat template is asked
            for and the tokenizer has none.
    """
    from converter.errors import UserError, read_user_text

    if cfg.prompts_file is None:
        return [[int(t) for t in row[: cfg.prompt_tokens]] for row in windows.input_ids[: cfg.prompts]]
    path = Path(cfg.prompts_file) if Path(cfg.prompts_file).is_absolute() else base_dir / cfg.prompts_file
    lines = [line for line in read_user_text(path, "parity.generation.prompts_file").splitlines() if line.strip()]
    if cfg.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("parity.generation.chat_template: the checkpoint's tokenizer has no chat template")
        prompts = [chat_prompt(tokenizer, line) for line in lines[: cfg.prompts]]
    else:
        prompts = [text_ids(tokenizer, line) for line in lines[: cfg.prompts]]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UserError(f"parity.generation.prompts_file {path}: no non-empty prompt")
    return prompts
