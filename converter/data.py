"""Text files into fixed-length token windows for calibration and evaluation."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from converter.errors import UserError, read_user_text
from converter.recipe import LoadedRecipe, TextData


@dataclass(frozen=True)
class Windows:
    """Token windows cut from a corpus.

    Attributes:
        input_ids: (N, T) int64, non-overlapping windows in corpus order (or seeded sample order).
        sha256: digest of the corpus bytes and of the settings that cut it.
        total_windows: how many windows the corpus held before `num_samples` was applied.
        decode_windows, decode_steps: calibration of a KV-cache graph also runs the first
            `decode_windows` windows as greedy one-token decode steps (converter/decode_calib.py).
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


def token_windows(recipe: LoadedRecipe, data: TextData, tokenizer, shuffle: bool,
                  wrap: tuple[int, int] | None = None) -> Windows:
    """Tokenize the data files and cut non-overlapping windows of `data.seq_len` tokens.

    Args:
        shuffle: pick `num_samples` windows at random with `data.seed` (calibration) instead of
            the first `num_samples` in order (evaluation).
        wrap: (first, last) token ids around each window's `seq_len - 2` text tokens: an encoder
            always sees [CLS] ... [SEP], and those tokens carry its largest activations.

    Raises:
        UserError: the corpus is shorter than one window.
    """
    files = [recipe.path(f) for f in data.files]
    corpus = read_corpus(files, data.jsonl_field)
    ids = tokenizer(corpus, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    width = data.seq_len - (2 if wrap else 0)
    total = len(ids) // width
    if total == 0:
        raise UserError(
            f"data {', '.join(data.files)}: {len(ids)} tokens, fewer than one window of "
            f"seq_len {data.seq_len}"
        )
    windows = torch.tensor(ids[: total * width], dtype=torch.int64).view(total, width)
    if wrap:
        first, last = (torch.full((total, 1), t, dtype=torch.int64) for t in wrap)
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
