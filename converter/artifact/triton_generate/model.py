"""Triton python-backend model `<prefix>-generate`: text in, greedy tokens out, KV cache kept here.

Decoupled: a request with `stream` true gets one response per token (its text piece and id), then
an empty response carrying the final flag; otherwise one response with the whole text and every id.
Requests are queued to the engine's scheduler thread (engine.py), which batches the decode steps of
all active sequences; `execute` only validates and queues, so new requests are admitted between
decode steps. A bad request gets an error response; the model goes on serving.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import Engine, RequestError, Sequence  # noqa: E402

DEFAULT_MAX_TOKENS = 32  # as `convert.py generate --max-new-tokens`
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _scalar(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise RequestError(f"{name} holds {values.size} values: expected one")
    return values[0]


def _response(texts: list[str], ids: list[int]):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([t.encode("utf-8") for t in texts], dtype=np.object_)),
        pb_utils.Tensor("token_ids", np.array(ids, dtype=np.int64))])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.name = args["model_name"]
        self.engine = Engine(folder, max_batch=int(params.get("max_batch", "16")),
                             pad_budget=int(params.get("pad_budget", "64")),
                             threads=int(params.get("intra_op_thread_count", "0")))
        self._count_decode_steps()
        self.engine.start()
        pb_utils.Logger.log_info(f"generate: {folder}, context {self.engine.context}, max batch "
                                 f"{self.engine.max_batch}, padded batching {self.engine.pad_ok}")

    def _count_decode_steps(self) -> None:
        """Decode batching on Triton's metrics endpoint: two counters, decode calls and the rows they
        decoded (their ratio is the mean decode batch), and a gauge, the widest decode call since the
        model loaded (more than 1 only if concurrent requests shared a call)."""
        kinds = {"generate_decode_steps": (pb_utils.MetricFamily.COUNTER, "batched decode calls"),
                 "generate_decode_rows": (pb_utils.MetricFamily.COUNTER, "sequences decoded, summed over decode calls"),
                 "generate_decode_widest": (pb_utils.MetricFamily.GAUGE, "most sequences in one decode call")}
        families = [pb_utils.MetricFamily(name=name, description=text, kind=kind)
                    for name, (kind, text) in kinds.items()]
        steps, rows, widest = (family.Metric(labels={"model": self.name}) for family in families)
        self._metric_families = families  # a family must outlive its metrics
        most = 0

        def count(batch: int) -> None:
            nonlocal most
            steps.increment(1)
            rows.increment(batch)
            if batch > most:
                most = batch
                widest.set(batch)

        self.engine.on_decode = count

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.engine.submit(self._sequence(request, sender))
            except Exception as exc:  # noqa: BLE001 - a RequestError, or a tokenizer failure: answer, keep serving
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=FINAL)
        return None

    def _sequence(self, request, sender) -> Sequence:
        """The request as an engine sequence whose callbacks answer through `sender`.

        Raises:
            RequestError: a missing or empty prompt, a bad max_tokens, too long for the context.
        """
        text = _scalar(request, "text_input")
        if text is None:
            raise RequestError("text_input is missing")
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        max_tokens = _scalar(request, "max_tokens")
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens)
        streaming = bool(_scalar(request, "stream") or False)
        prompt = self.engine.prompt_ids(text, max_tokens)

        def emit(sequence, token, piece):
            if streaming:
                sender.send(_response([piece], [token]))

        def finish(sequence, error):
            try:
                if error is not None:
                    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))), flags=FINAL)
                elif streaming:
                    sender.send(flags=FINAL)
                else:
                    sender.send(_response(["".join(sequence.pieces)], sequence.tokens), flags=FINAL)
            except Exception as exc:  # noqa: BLE001 - the client went away: nothing to answer
                pb_utils.Logger.log_warn(f"generate: could not answer a request ({exc})")

        cancelled = getattr(sender, "is_cancelled", lambda: False)
        return Sequence(prompt, max_tokens, emit, finish, cancelled)

    def finalize(self):
        self.engine.stop()
