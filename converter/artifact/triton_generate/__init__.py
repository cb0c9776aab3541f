"""The `<prefix>-generate` Triton model of a KV-cache decoder artifact (python backend).

`model.py` and `engine.py` beside this file are the model's source: they are copied into its
version folder with the artifact's `model.onnx` and tokenizer files, and run inside Triton's python
backend in the serving environment (no torch). This module only builds the model's description for
converter/artifact/triton.py: its files and its `ModelConfig`, which triton.py renders, parses back strictly
and compares field by field, as it does for every other model.
"""

from __future__ import annotations

from pathlib import Path

SUFFIX = "generate"
SOURCES = ("model.py", "engine.py")
MAX_BATCH = 16  # sequences decoded in one step; more wait in the queue
PAD_BUDGET = 64  # pad tokens a sequence may carry to join a running batch (see engine.py)
INPUTS = (("text_input", "TYPE_STRING", False), ("max_tokens", "TYPE_INT32", True), ("stream", "TYPE_BOOL", True))
OUTPUTS = (("text_output", "TYPE_STRING"), ("token_ids", "TYPE_INT64"))


def unservable(manifest: dict) -> str | None:
    """Why the artifact gets no generate model, or None when it gets one."""
    model = manifest.get("model", {})
    if model.get("kind") != "decoder":
        return f"the model is of kind {model.get('kind')!r}: generate serves decoders"
    if not model.get("kv_cache"):
        return "no KV cache in the graph (export.kv_cache: false)"
    return None


def batch_limit(manifest: dict) -> int:
    """Per-tensor dynamic activation scales (O2) are taken over the whole batch, so a sequence's
    tokens would depend on its neighbours: such artifacts decode one sequence per step."""
    activations = manifest["recipe"].get("quantization", {}).get("activations", {})
    dynamic_per_tensor = activations.get("mode") == "dynamic" and activations.get("granularity") == "per_tensor"
    return 1 if dynamic_per_tensor else MAX_BATCH


def files(folder: Path, manifest: dict) -> dict[str, Path]:
    """Version-folder name -> source: the model source, the graph (and its external data) and the
    tokenizer files the artifact carries."""
    from converter.models.load import TOKENIZER_FILES

    here = Path(__file__).parent
    model = manifest["model"]["file"]
    graph = [folder / model, *sorted(p for p in folder.glob(f"{model}.data*") if p.is_file())]
    return {**{name: here / name for name in SOURCES},
            **{("model.onnx" if p.name == model else p.name): p for p in graph},
            **{name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}}


def parameters(spec) -> dict[str, str]:
    threads = getattr(spec.settings, "intra_op_thread_count", 0)
    return {"max_batch": str(spec.max_batch), "pad_budget": str(PAD_BUDGET), "intra_op_thread_count": str(threads)}


def model_config(spec):
    """The generate model's `ModelConfig`: python backend, decoupled, one sequence per request
    (max_batch_size 0: the model batches decode steps itself)."""
    from tritonclient.grpc import model_config_pb2 as pb

    config = pb.ModelConfig(name=spec.name, backend="python", max_batch_size=0)
    config.model_transaction_policy.decoupled = True
    for name, dtype, optional in INPUTS:
        config.input.add(name=name, data_type=pb.DataType.Value(dtype), dims=[1], optional=optional)
    for name, dtype in OUTPUTS:
        config.output.add(name=name, data_type=pb.DataType.Value(dtype), dims=[-1])
    config.instance_group.add(count=1, kind=pb.ModelInstanceGroup.Kind.Value("KIND_CPU"))
    for key, value in parameters(spec).items():
        config.parameters[key].string_value = value
    return config
