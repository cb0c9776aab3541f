"""Greedy generation with a server-side KV cache and continuous batching, over an artifact's KV graph.

This file runs inside Triton's python backend, in the serving environment (numpy<2, onnxruntime,
transformers, no torch), so it imports nothing from the converter.

Scheduling. Each new request is prefilled alone (batch 1, empty past: the fused-attention graph
refuses a multi-token step on a non-empty past at batch > 1), and its one-token decode steps then
run in one batched ONNX Runtime call with every other active sequence of its *cohort*. Rows are
left-padded (`attention_mask` 0) to the cohort's width. The graph places every row's new token at
position `width - 1` (rotary and learned positions alike come from the mask's width, not from the
row's own length), and the keys in the cache were rotated where they were computed. So a row can
only join a cohort if it was computed in that cohort's frame: the new request is prefilled with
`width - len(prompt)` pad tokens in front, which puts its tokens where the cohort's next step
expects them. Rotary attention depends only on position differences, so its tokens are those of an
unpadded run; whether that holds for a model is probed at load (`padding_is_invariant`), and a
model for which it does not (learned absolute positions: GPT-2) batches only sequences of equal
length. A cohort accepts a row while the padding stays within `pad_budget` and the row's last
position stays inside the context; otherwise the row starts a new cohort. Each decode step runs one
call per cohort; a cohort ends with its last row.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

PAST, PRESENT = "past_key_values", "present"
_PROBE = "The patient is afebrile."  # the converter's probe text for the tokenizer's added tokens


class RequestError(ValueError):
    """A request the model refuses (empty prompt, too long for the context, bad max_tokens)."""


def added_special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids the tokenizer puts around every text: converter.models.text's rule, repeated here
    because the serving environment has no torch (tests check both give the same ids)."""
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain):])
    return [], []


@dataclass
class Sequence:
    """One request: prompt ids in, tokens out through `emit(sequence, token, text_piece)`;
    `finish(sequence, error)` once, with None or the exception that ended it."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[["Sequence", int, str], None]
    finish: Callable[["Sequence", Exception | None], None]
    cancelled: Callable[[], bool] = lambda: False
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)  # the text, as streamed
    decoded: str = ""  # the tokens decoded so far


@dataclass
class Cohort:
    """Sequences decoded together: (B, heads, width, head_dim) past per cache tensor, (B, width) mask."""

    rows: list[Sequence]
    past: dict[str, np.ndarray]
    mask: np.ndarray

    @property
    def width(self) -> int:
        return self.mask.shape[1]


class Engine:
    """Prefill, batched decode and the step-level scheduler over one ONNX Runtime session.

    Args:
        folder: holds model.onnx (and its external data) and the tokenizer files.
        max_batch: most sequences decoding at once; more wait in the queue.
        pad_budget: most pad tokens a sequence may carry to join a running cohort.
        threads: ONNX Runtime intra-op threads (0: its default).
    """

    def __init__(self, folder: str, max_batch: int = 16, pad_budget: int = 64, threads: int = 0):
        import onnxruntime as ort
        from transformers import AutoConfig, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        config = AutoConfig.from_pretrained(folder)
        limit = getattr(config, "max_position_embeddings", None)
        self.context = limit if isinstance(limit, int) and limit > 0 else None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(f"{folder}/model.onnx", options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        past = [i for i in self.session.get_inputs() if i.name.startswith(f"{PAST}.")]
        if not past:
            raise ValueError(f"{folder}/model.onnx has no {PAST}.* inputs: generate serves KV-cache graphs only")
        self.past_names = [i.name for i in past]
        self.present_names = [n.replace(PAST, PRESENT, 1) for n in self.past_names]
        self.kv_shape = (past[0].shape[1], past[0].shape[3])  # (kv_heads, head_dim)
        self.bos = added_special_tokens(self.tokenizer)[0]
        self.eos = self.tokenizer.eos_token_id
        self.max_batch, self.pad_budget = max(1, max_batch), pad_budget
        self.pad_ok = self.padding_is_invariant()
        self.waiting: queue.Queue[Sequence | None] = queue.Queue()
        self.cohorts: list[Cohort] = []
        self.steps = 0  # batched decode calls so far
        self.on_decode: Callable[[int], None] = lambda rows: None  # told each decode call's batch size
        self._thread: threading.Thread | None = None

    # --- requests -------------------------------------------------------------------------
    def prompt_ids(self, text: str, max_tokens: int) -> list[int]:
        """The prompt's ids as `convert.py generate` builds them (the tokenizer's BOS, then the text).

        Raises:
            RequestError: empty prompt, max_tokens < 1, or prompt + max_tokens past the context.
        """
        if max_tokens < 1:
            raise RequestError(f"max_tokens is {max_tokens}: expected a positive integer")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RequestError("text_input is empty after tokenization")
        ids = self.bos + list(ids)
        if self.context is not None and len(ids) + max_tokens > self.context:
            raise RequestError(f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is "
                               f"{len(ids) + max_tokens} tokens, more than the model's context of {self.context}")
        return ids

    def submit(self, sequence: Sequence) -> None:
        self.waiting.put(sequence)

    # --- the model ------------------------------------------------------------------------
    def _run(self, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, {"input_ids": ids, "attention_mask": mask, **past})))

    def prefill(self, prompt: list[int], width: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Run `prompt` alone, left-padded to `width`: (present tensors, mask (1, width), last logits (V,))."""
        pad = width - len(prompt)
        ids = np.array([[0] * pad + prompt], dtype=np.int64)
        mask = np.array([[0] * pad + [1] * len(prompt)], dtype=np.int64)
        empty = np.zeros((1, self.kv_shape[0], 0, self.kv_shape[1]), dtype=np.float32)
        out = self._run(ids, mask, {name: empty for name in self.past_names})
        return {p: out[q] for p, q in zip(self.past_names, self.present_names)}, mask, out["logits"][0, -1]

    def decode(self, cohort: Cohort, last: list[int]) -> np.ndarray:
        """One batched decode step of every row of `cohort`; returns the logits (B, V)."""
        ones = np.ones((len(cohort.rows), 1), dtype=np.int64)
        cohort.mask = np.concatenate([cohort.mask, ones], axis=1)
        out = self._run(np.array(last, dtype=np.int64)[:, None], cohort.mask, cohort.past)
        cohort.past = {p: out[q] for p, q in zip(self.past_names, self.present_names)}
        self.steps += 1
        self.on_decode(len(cohort.rows))
        return out["logits"][:, -1]

    def padding_is_invariant(self) -> bool:
        """Whether left padding leaves a prompt's logits unchanged (position-relative attention), so
        sequences of different lengths may share a decode step."""
        probe = self.bos + list(self.tokenizer(_PROBE, add_special_tokens=False)["input_ids"])[:8]
        plain, padded = self.prefill(probe, len(probe))[2], self.prefill(probe, len(probe) + 5)[2]
        scale = float(np.abs(plain).max()) or 1.0
        return bool(plain.argmax() == padded.argmax() and np.abs(plain - padded).max() <= 1e-3 * scale)

    # --- the scheduler --------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="generate-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.waiting.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while True:
            if not self.cohorts:  # idle: block until a request arrives
                first = self.waiting.get()
                if first is None:
                    return
                self.waiting.put(first)
            if not self.run_step():
                return

    def run_step(self) -> bool:
        """Admit waiting requests (each prefilled alone), then run one decode step per cohort.
        Returns False once `stop` was asked for."""
        room = self.max_batch - sum(len(c.rows) for c in self.cohorts)
        arrived = []
        while len(arrived) < room:
            try:
                sequence = self.waiting.get_nowait()
            except queue.Empty:
                break
            if sequence is None:
                self._fail_all(RuntimeError("the model is being unloaded"), arrived)
                return False
            arrived.append(sequence)
        # longest first: the shorter prompts that arrived with it can join its cohort, padded
        for sequence in sorted(arrived, key=lambda s: -len(s.prompt)):
            self._admit(sequence)
        for cohort in list(self.cohorts):
            self._decode_cohort(cohort)
        return True

    def _admit(self, sequence: Sequence) -> None:
        """Prefill `sequence` into the cohort it fits best (least padding), or a new one."""
        n, end = len(sequence.prompt), len(sequence.prompt) + sequence.max_tokens
        fits = [c for c in self.cohorts if len(c.rows) and c.width >= n
                and (c.width - n <= self.pad_budget if self.pad_ok else c.width == n)
                and (self.context is None or c.width - n + end <= self.context)]
        cohort = min(fits, key=lambda c: c.width - n, default=None)
        try:
            past, mask, logits = self.prefill(sequence.prompt, cohort.width if cohort else n)
        except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the server
            sequence.finish(sequence, exc)
            return
        if not self._emit(sequence, int(logits.argmax())):
            return
        if cohort is None:
            self.cohorts.append(Cohort([sequence], past, mask))
        else:
            cohort.rows.append(sequence)
            cohort.past = {k: np.concatenate([cohort.past[k], past[k]], axis=0) for k in cohort.past}
            cohort.mask = np.concatenate([cohort.mask, mask], axis=0)

    def _decode_cohort(self, cohort: Cohort) -> None:
        try:
            logits = self.decode(cohort, [row.tokens[-1] for row in cohort.rows])
        except Exception as exc:  # noqa: BLE001
            for row in cohort.rows:
                row.finish(row, exc)
            self.cohorts.remove(cohort)
            return
        keep = [i for i, row in enumerate(cohort.rows) if self._emit(row, int(logits[i].argmax()))]
        if not keep:
            self.cohorts.remove(cohort)
        elif len(keep) < len(cohort.rows):
            cohort.rows = [cohort.rows[i] for i in keep]
            cohort.past = {k: v[keep] for k, v in cohort.past.items()}
            cohort.mask = cohort.mask[keep]

    def _emit(self, sequence: Sequence, token: int) -> bool:
        """Hand one new token to the request; True while the sequence goes on."""
        sequence.tokens.append(token)
        full = self.tokenizer.decode(sequence.tokens, skip_special_tokens=True)
        # as convert.py generate: byte-level BPE pieces only form characters together
        piece = full[len(sequence.decoded):] if full.startswith(sequence.decoded) else full
        sequence.decoded = full
        sequence.pieces.append(piece)
        try:
            sequence.emit(sequence, token, piece)
        except Exception as exc:  # noqa: BLE001 - the client is gone
            sequence.finish(sequence, exc)
            return False
        if sequence.cancelled():
            sequence.finish(sequence, RequestError("cancelled"))
            return False
        done = len(sequence.tokens) >= sequence.max_tokens or (self.eos is not None and token == self.eos)
        if done:
            sequence.finish(sequence, None)
        return not done

    def _fail_all(self, error: Exception, arrived: list[Sequence]) -> None:
        for row in [*(r for c in self.cohorts for r in c.rows), *arrived]:
            row.finish(row, error)
        self.cohorts.clear()
        while True:
            try:
                sequence = self.waiting.get_nowait()
            except queue.Empty:
                return
            if sequence is not None:
                sequence.finish(sequence, error)
