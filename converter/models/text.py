"""Text files into fixed-length token windows for calibration and evaluation."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from converter.errors import UserError, read_user_text

if TYPE_CHECKING:  # annotations only: the recipe sits above the stages
    from converter.recipe import LoadedRecipe, TextData


@dataclass(frozen=True)
class Windows:
    """Token windows cut from a corpus.

    Attributes:
        input_ids: (N, T) int64, non-overlapping windows in corpus order (or seeded sample order).
        sha256: digest of the corpus bytes and of the settings that cut it.
        total_windows: how many windows the corpus held before `num_samples` was applied.
        decode_windows, decode_steps: calibration of a KV-cache graph also runs the first
            `decode_windows` windows as greedy one-token decode steps (converter/quant/decode_steps.py).
    """

    input_ids: torch.Tensor
    sha256: str
    total_windows: int
    decode_windows: int = 0
    decode_steps: int = 0

    def with_decode(self, windows: int, steps: int) -> "Windows":
        """These windows plus decode-step calibration (the digest changes with the settings)."""
        digest = hashlib.sha256(f"{self.sha256}:decode:{windows}:{steps}".encode()).hexdigest()
        return replace(self, sha256=digest, decode_windows=min(windows, len(self.input_ids)), decode_steps=steps)

    def batches(self, batch_size: int):
        """Yield (input_ids, attention_mask) batches; every window is full, so the mask is ones."""
        for start in range(0, len(self.input_ids), batch_size):
            ids = self.input_ids[start : start + batch_size]
            yield ids, torch.ones_like(ids)


def read_corpus(files: list[Path], jsonl_field: str) -> str:
    """Concatenate text files; `.jsonl` files contribute `jsonl_field` of each line's object.

    Raises:
        UserError: a missing or non-UTF-8 file, a JSONL line that is not an object with the field.
    """
    parts = []
    for path in files:
        text = read_user_text(path, "data file")
        if path.suffix != ".jsonl":
            parts.append(text)
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(jsonl_field), str):
                raise UserError(f"{path}:{lineno}: expected an object with a string {jsonl_field!r}")
            parts.append(record[jsonl_field])
    return "\n\n".join(parts)


def shared_files(recipe: LoadedRecipe, calibration: TextData, evaluation: TextData) -> list[str]:
    """The evaluation files whose bytes are also a calibration file (under any name). Only files of
    equal size are read and hashed."""
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    calibrated: dict[int, list[Path]] = {}
    for path in map(recipe.path, calibration.files):
        calibrated.setdefault(path.stat().st_size, []).append(path)
    shared = []
    for name in evaluation.files:
        path = recipe.path(name)
        twins = calibrated.get(path.stat().st_size, [])
        if twins and digest(path) in {digest(t) for t in twins}:
            shared.append(name)
    return shared


_PROBE = "The patient is afebrile."


def added_special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids `tokenizer` puts around every text by default (`add_special_tokens`):
    ([BOS], []) for Llama 3, Gemma, Mistral or Phi-3, ([CLS], [SEP]) for BERT, ([], []) for GPT-2,
    Qwen or SmolLM2. Found by tokenizing a probe text both ways, so it holds whatever the tokenizer's
    post-processor does, whatever its `add_bos_token` attribute says."""
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain):])
    return [], []


def length_batches(sequences: list[list[int]], max_batch: int | None) -> list[list[int]]:
    """Row indices of `sequences` grouped by length, each group split into at most `max_batch` rows
    (None: no limit): batches that need no padding, so each row computes what it would alone."""
    by_length: dict[int, list[int]] = {}
    for i, seq in enumerate(sequences):
        by_length.setdefault(len(seq), []).append(i)
    size = max_batch or len(sequences) or 1
    return [rows[k:k + size] for rows in by_length.values() for k in range(0, len(rows), size)]


def text_ids(tokenizer, text: str) -> list[int]:
    """`text` as a decoder gets it in use: its tokens after the tokenizer's leading special tokens
    (a BOS), without any it appends (an EOS would tell the model the text has ended)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return added_special_tokens(tokenizer)[0] + list(ids) if ids else []


def window_wrap(tokenizer, kind: str) -> tuple[int | None, int | None] | None:
    """The special tokens around every calibration and evaluation window, as the model meets them in
    use, from what the tokenizer adds to a text (`added_special_tokens`): an encoder's (first, last),
    e.g. ([CLS], [SEP]); a decoder's (BOS, None) when its tokenizer starts every text with one (what
    `generate` and every prompt get; Gemma and Llama 3 put their largest activations on it), never an
    EOS after. A side the tokenizer adds nothing to, or more than one token to, is None; None: plain
    text tokens."""
    prefix, suffix = added_special_tokens(tokenizer)
    first = prefix[0] if len(prefix) == 1 else None
    last = suffix[0] if kind == "encoder" and len(suffix) == 1 else None
    return None if first is None and last is None else (first, last)


def token_windows(recipe: LoadedRecipe, data: TextData, tokenizer, shuffle: bool,
                  wrap: tuple[int | None, int | None] | None = None) -> Windows:
    """Tokenize the data files and cut non-overlapping windows of `data.seq_len` tokens.

    Args:
        shuffle: pick `num_samples` windows at random with `data.seed` (calibration) instead of
            the first `num_samples` in order (evaluation).
        wrap: (first, last) token ids around each window's text tokens, either None for none on
            that side (see `window_wrap`): an encoder always sees [CLS] ... [SEP], a Gemma its BOS
            first, and those tokens carry the model's largest activations.

    Raises:
        UserError: the corpus is shorter than one window.
    """
    files = [recipe.path(f) for f in data.files]
    corpus = read_corpus(files, data.jsonl_field)
    ids = tokenizer(corpus, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    width = data.seq_len - (sum(t is not None for t in wrap) if wrap else 0)
    total = len(ids) // width
    if total == 0:
        raise UserError(
            f"data {', '.join(data.files)}: {len(ids)} tokens, fewer than one window of "
            f"seq_len {data.seq_len}"
        )
    windows = torch.tensor(ids[: total * width], dtype=torch.int64).view(total, width)
    if wrap:
        first, last = (torch.full((total, 1 if t is not None else 0), t or 0, dtype=torch.int64) for t in wrap)
        windows = torch.cat([first, windows, last], dim=1)
    if shuffle:
        order = torch.randperm(total, generator=torch.Generator().manual_seed(data.seed))
        windows = windows[order]
    windows = windows[: data.num_samples]
    digest = hashlib.sha256(corpus.encode("utf-8"))
    digest.update(json.dumps(data.model_dump(exclude={"files"}), sort_keys=True).encode())
    if wrap:
        digest.update(json.dumps({"wrap": list(wrap)}).encode())
    return Windows(input_ids=windows.contiguous(), sha256=digest.hexdigest(), total_windows=total)
