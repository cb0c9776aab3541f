"""Decode-step calibration: activations of one-token steps that feed the model's own greedy tokens.

In float, a token's activations are the same whether it is computed in a full-window prefill or in a
decode step (causal attention), so what decode steps add is the *tokens*: during generation the
model reads its own argmax continuations, whose activations a static scale calibrated only on
corpus text has never seen. Each decode window is run as a prefill of its first
`seq_len - decode_steps` tokens (not recorded: the full-window prefill already covers them),
then `decode_steps` one-token steps through the HF cache, each recorded.
"""

from __future__ import annotations

import torch

from converter.models.text import Windows


@torch.no_grad()
def decode_pass(model: torch.nn.Module, windows: Windows, batch_size: int, recording: dict) -> int:
    """Greedy decode steps on the first `windows.decode_windows` windows; returns decoded tokens.

    Args:
        recording: {"on": bool}, shared with the hooks: False while the prefix is prefilled.
    """
    from transformers import DynamicCache

    steps = windows.decode_steps
    ids_all = windows.input_ids[: windows.decode_windows, : windows.input_ids.shape[1] - steps]
    tokens = 0
    for start in range(0, len(ids_all), batch_size):
        prefix = ids_all[start : start + batch_size]  # (B, T - steps)
        cache = DynamicCache(config=model.config)
        recording["on"] = False
        out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), past_key_values=cache, use_cache=True)
        recording["on"] = True
        seen = prefix.shape[1]
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)  # (B, 1): the model's own greedy token
            seen += 1
            out = model(input_ids=nxt, attention_mask=torch.ones(len(nxt), seen, dtype=torch.int64),
                        past_key_values=cache, use_cache=True)
            tokens += nxt.numel()
    return tokens
