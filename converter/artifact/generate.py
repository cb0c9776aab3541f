"""The `generate` command: open an artifact (tokenizer + ONNX Runtime session on its model.onnx,
checked against its manifest) and stream greedy tokens from a prompt."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from converter.export.kv_graph import KvLayout
from converter.models.text import text_ids
from converter.parity.generation import Step, chat_prompt, greedy_graph, session_step


@dataclass
class OpenArtifact:
    """An artifact's tokenizer and INT8 graph, ready to generate from."""

    tokenizer: object
    step: Step
    layout: KvLayout | None
    config: object  # the checkpoint's transformers config (context length), None without config.json
    threads: int = 0  # the session's intra-op thread count, as ONNX Runtime holds it (0: its default)


def open_artifact(artifact: Path, threads: int = 0) -> OpenArtifact:
    """Load an artifact's tokenizer and start an ONNX Runtime session on its model.onnx.

    Raises:
        UserError: the folder has no model.onnx or no tokenizer files, or a file that fails to load
            does not match the manifest (a damaged copy).
    """
    from transformers import AutoConfig, AutoTokenizer

    from converter.errors import UserError, first_line, listed
    from converter.export.kv_graph import graph_kv_layout
    from converter.targets.runners import onnxruntime_session

    model_path = artifact / "model.onnx"
    if not model_path.is_file():
        raise UserError(f"{artifact} is not an artifact (no model.onnx)")
    if not (artifact / "tokenizer.json").is_file() and not (artifact / "tokenizer_config.json").is_file():
        raise UserError(f"{artifact}: no tokenizer files (tokenizer.json) beside model.onnx")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(artifact))
        config = AutoConfig.from_pretrained(str(artifact)) if (artifact / "config.json").is_file() else None
        session = onnxruntime_session(model_path, threads=threads)
        return OpenArtifact(tokenizer, session_step(session), graph_kv_layout(model_path), config,
                            session.get_session_options().intra_op_num_threads)
    except Exception as exc:  # a truncated copy or download: say which files, not ONNX Runtime's traceback
        from converter.artifact.package import verify

        problems = verify(artifact) if (artifact / "manifest.json").is_file() else []
        if not problems:
            raise
        raise UserError(f"{artifact} is damaged ({listed(problems, '; ')}): {first_line(exc)[:200]}") from None


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids: as text to continue (after the tokenizer's BOS, if it puts one before
    every text, as the calibration windows have it), or (`chat`) as one user message in the chat template.

    Raises:
        UserError: the prompt is empty after tokenization, or `chat` with a tokenizer that has no template.
    """
    from converter.errors import UserError

    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat: the artifact's tokenizer has no chat template (drop --chat to continue raw text)")
        return chat_prompt(tokenizer, prompt)
    ids = text_ids(tokenizer, prompt)  # with the BOS a Gemma or Llama 3 tokenizer starts every text with
    if not ids:
        raise UserError("--prompt is empty after tokenization")
    return ids


def stream(opened: OpenArtifact, prompt: list[int], max_new_tokens: int) -> Iterator[tuple[int, str]]:
    """Yield (token id, newly decoded text), greedy, until EOS or `max_new_tokens`."""
    tokenizer = opened.tokenizer
    generated: list[int] = []
    text = ""
    for token in greedy_graph(opened.step, opened.layout, prompt, max_new_tokens, tokenizer.eos_token_id):
        generated.append(token)
        # decode the whole continuation: byte-level BPE pieces only form characters together
        full = tokenizer.decode(generated, skip_special_tokens=True)
        yield token, full[len(text):] if full.startswith(text) else full
        text = full


def generate_record(artifact: Path, prompt: str, max_new_tokens: int, echo, chat: bool = False,
                    threads: int = 0) -> dict:
    """Open `artifact` and run `stream`, handing each text piece to `echo`; returns the JSON record.

    Times are split: `load_s` (tokenizer and ONNX Runtime session), `first_token_s` (the prefill that
    yields the first new token), then `tokens_per_s` over the decode steps after it.

    Args:
        threads: ONNX Runtime intra-op threads; 0 leaves ONNX Runtime's default (one per physical core).
    """
    start = time.perf_counter()
    opened = open_artifact(artifact, threads)
    ids = prompt_ids(opened.tokenizer, prompt, chat)
    if opened.config is not None:
        from converter.models.load import check_context

        check_context(opened.config, {"--prompt plus --max-new-tokens": len(ids) + max_new_tokens})
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    first = None
    tokens, pieces = [], []
    for token, piece in stream(opened, ids, max_new_tokens):
        first = first if first is not None else time.perf_counter() - start
        tokens.append(token)
        pieces.append(piece)
        echo(piece)
    total = time.perf_counter() - start
    decode_s = total - (first or 0.0)
    return {"artifact": str(artifact), "prompt": prompt, "chat": chat, "threads": opened.threads,
            "prompt_tokens": ids, "tokens": tokens,
            "text": "".join(pieces), "new_tokens": len(tokens), "load_s": round(load_s, 4),
            "first_token_s": round(first or 0.0, 4), "seconds": round(total, 4),
            "tokens_per_s": round((len(tokens) - 1) / decode_s, 2) if len(tokens) > 1 and decode_s > 0 else None}
