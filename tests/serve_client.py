"""Clients of a running Triton server's generate model: HTTP (one answer or server-sent events) and
gRPC (a stream, with or without token-by-token responses)."""

import json
import threading
import urllib.error
import urllib.request

import numpy as np

from runcli import NAME

MODEL = f"{NAME}-generate"


def http_generate(server, body: dict, stream: bool = False, model: str = MODEL):
    """POST /generate (one JSON answer) or /generate_stream (server-sent events: a list of answers)."""
    path = "generate_stream" if stream else "generate"
    request = urllib.request.Request(f"{server.url}/v2/models/{model}/{path}", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, **json.loads(exc.read().decode())}
    if not stream:
        return json.loads(text)
    return [json.loads(line.removeprefix("data: ")) for line in text.splitlines() if line.startswith("data: ")]


def grpc_generate(server, prompt, max_tokens=None, stream=False, max_tokens_dtype="INT32", model=MODEL):
    """One request over a gRPC stream: (responses' (text, ids), errors, final flags seen)."""
    import tritonclient.grpc as grpcclient

    results, errors, done = [], [], threading.Event()

    def callback(result, error):
        if error is not None:
            errors.append(str(error))
            done.set()
            return
        final = result.get_response().parameters["triton_final_response"].bool_param
        if result.as_numpy("text_output") is not None:
            results.append((b"".join(result.as_numpy("text_output")).decode(), result.as_numpy("token_ids").tolist()))
        if final:
            done.set()

    inputs = [grpcclient.InferInput("text_input", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    if max_tokens is not None:
        inputs.append(grpcclient.InferInput("max_tokens", [1], max_tokens_dtype))
        inputs[-1].set_data_from_numpy(np.array([max_tokens], dtype=np.int32 if max_tokens_dtype == "INT32" else np.float32))
    if stream:
        inputs.append(grpcclient.InferInput("stream", [1], "BOOL"))
        inputs[-1].set_data_from_numpy(np.array([True]))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=callback)
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        assert done.wait(60), "no final response"
    finally:
        client.stop_stream()
        client.close()
    return results, errors
