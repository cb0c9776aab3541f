"""One runner interface for every backend: Polygraphy's `activate / infer(dict) -> dict / deactivate`.

Parity code never cares which backend produced a result. Polygraphy ships runners for ONNX Runtime
and TensorRT; its PyTorch runner moves inputs to CUDA, so the CPU PyTorch runner lives here.
"""

from __future__ import annotations

import functools
import platform
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy import mod
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.logger import G_LOGGER

# Polygraphy logs to stdout, which `--json` reserves; its verdicts are in our reports instead.
G_LOGGER.module_severity = G_LOGGER.CRITICAL


class TorchRunner(BaseRunner):
    """Runs an HF model (or a lazy loader of one) in PyTorch on CPU; returns the graph's output.

    `io` (`converter.models.io.ModelIO`) names the inputs and the output; None: a causal LM's
    (input_ids, attention_mask) -> logits. With a KV layout (decoders) it also takes the
    `past_key_values.*` inputs of a KV-cache graph (so one feed serves both); a non-empty past goes
    into an HF DynamicCache.
    """

    def __init__(self, model, name: str | None = None, io=None, layout=None):
        from converter.models.io import ModelIO

        super().__init__(name=name, prefix="torch-runner")
        self._model = model
        self.io = io or ModelIO("decoder", ("input_ids", "attention_mask"), "logits")
        self.layout = layout

    def activate_impl(self):
        self.model = self._model() if callable(self._model) and not isinstance(self._model, torch.nn.Module) else self._model
        self.model.eval()

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name in self.io.inputs:
            meta.add(name, np.int64, ("batch", "sequence"))
        if self.layout is not None:
            from converter.export.kv_graph import past_names

            for name in past_names(self.layout.num_layers):
                meta.add(name, np.float32, ("batch", self.layout.kv_heads, "past_sequence", self.layout.head_dim))
        return meta

    def infer_impl(self, feed_dict):
        with torch.no_grad():
            inputs = {name: torch.from_numpy(np.asarray(feed_dict[name])) for name in self.io.inputs}
            kwargs = self.io.forward_kwargs()
            cache = self._cache(feed_dict)
            if cache is not None:
                kwargs.update(past_key_values=cache, use_cache=True)
            start = time.perf_counter()
            out = getattr(self.model(**inputs, **kwargs), self.io.output)
            self.inference_time = time.perf_counter() - start
        return OrderedDict({self.io.output: out.numpy()})

    def _cache(self, feed_dict):
        if self.layout is None:
            return None
        from transformers import DynamicCache

        from converter.export.kv_graph import past_names

        past = [torch.from_numpy(np.asarray(feed_dict[n])) for n in past_names(self.layout.num_layers)]
        if past[0].shape[2] == 0:  # a prefill
            return None
        return DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])), config=self.model.config)

    def deactivate_impl(self):
        del self.model


class StreamedRunner(BaseRunner):
    """The FP32 reference of a block-streamed model (converter/models/lazy.py) on one set of windows.

    Activating it computes the logits of every batch of `windows` with each block read once
    (`streamed_logits`); `infer` then serves the batch its feed names, so `evaluate` reads it as it
    reads a `TorchRunner`, prefill feeds only (empty past). Holds one set's logits meanwhile.
    """

    def __init__(self, streamed, windows, batch_size: int, name: str | None = None):
        super().__init__(name=name, prefix="streamed-runner")
        self.streamed, self.windows, self.batch_size = streamed, windows, batch_size

    def activate_impl(self):
        from converter.quant.sequential import streamed_logits

        if self.streamed.prepare is not None:  # e.g. smoothed: float-equivalent, but not the checkpoint's logits
            raise RuntimeError(f"{self.name}: the reference must read the checkpoint as stored, not prepared blocks")
        batches = list(self.windows.batches(self.batch_size))
        logits = streamed_logits(self.streamed, batches)
        self.served = [(ids.numpy(), mask.numpy(), out.numpy()) for (ids, mask), out in zip(batches, logits)]

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name in ("input_ids", "attention_mask"):
            meta.add(name, np.int64, ("batch", "sequence"))
        return meta

    def infer_impl(self, feed_dict):
        ids, mask = np.asarray(feed_dict["input_ids"]), np.asarray(feed_dict["attention_mask"])
        for batch_ids, batch_mask, logits in self.served:
            if np.array_equal(batch_ids, ids) and np.array_equal(batch_mask, mask):
                return OrderedDict({"logits": logits})
        raise RuntimeError(f"{self.name}: a feed of shape {ids.shape} is none of the batches it computed")

    def deactivate_impl(self):
        del self.served


# x86 CPU flags whose int8 kernels sum uint8 x int8 products exactly (VNNI's vpdpbusd, AMX).
EXACT_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
EXACT_INT8_OPTION = "session.x64quantprecision"


def _on_x86() -> bool:
    return platform.machine().lower() in {"x86_64", "amd64", "i386", "i686", "x86"}


def x86_int8_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str] | None:
    """This x86 CPU's flags from EXACT_INT8_FLAGS (sorted); None off x86 or when they cannot be read."""
    if not _on_x86():
        return None
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(EXACT_INT8_FLAGS.intersection(flags))


@functools.cache
def int8_products_exact(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether ONNX Runtime's default int8 kernels are exact on this CPU.

    On x86 without VNNI (SSE4.1, AVX2, AVX-512 without VNNI) they multiply uint8 activations by
    int8 weights with vpmaddubsw, which adds each pair of neighbouring products in int16 and
    saturates at 32767 (see bench/saturation.py). Other architectures are exact. An x86 CPU whose
    flags cannot be read counts as inexact.
    """
    return not _on_x86() or bool(x86_int8_flags(cpuinfo))


def int8_kernels_here() -> str:
    """One line on the int8 kernels ONNX Runtime runs on this CPU (for `convert.py targets`)."""
    flags = x86_int8_flags()
    if flags:
        return f"{', '.join(flags)}: ONNX Runtime's fast int8 kernels, exact"
    if int8_products_exact():
        return f"{platform.machine()}: exact int8 kernels"
    return ("no VNNI or AMX: sessions use ONNX Runtime's exact uint8 kernels (session.x64quantprecision), "
            "slower than on a VNNI CPU (see bench/saturation.py)")


def onnxruntime_session(path: Path, optimized_model_path: Path | None = None, threads: int = 0):
    """A CPU ONNX Runtime session; optionally saves the optimized graph it will execute.

    On a CPU whose default int8 kernels saturate (`int8_products_exact`), the session asks for ONNX
    Runtime's exact uint8 x uint8 kernels (`session.x64quantprecision`): slower, but the artifact's
    int8 arithmetic, as parity measured it. Elsewhere it is left off: on a VNNI CPU it would only
    trade the VNNI kernels for slower exact ones (SmolLM2 INT8 decode: 101 -> 81 tokens/s).
    """
    ort = mod.lazy_import("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if not int8_products_exact():
        options.add_session_config_entry(EXACT_INT8_OPTION, "1")
    if optimized_model_path is not None:
        # EXTENDED (not ALL): the saved graph stays portable while holding the int8 QDQ fusions.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnxruntime_runner(path: Path, name: str | None = None) -> BaseRunner:
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(lambda: onnxruntime_session(path), name=name)
