"""One runner interface for every backend: Polygraphy's `activate / infer(dict) -> dict / deactivate`.

Parity code never cares which backend produced a result. Polygraphy ships runners for ONNX Runtime
and TensorRT; its PyTorch runner moves inputs to CUDA, so the CPU PyTorch runner lives here.
"""

from __future__ import annotations

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

    `io` (`converter.encoder.ModelIO`) names the inputs and the output; None: a causal LM's
    (input_ids, attention_mask) -> logits.
    """

    def __init__(self, model, name: str | None = None, io=None):
        from converter.encoder import ModelIO

        super().__init__(name=name, prefix="torch-runner")
        self._model = model
        self.io = io or ModelIO("decoder", ("input_ids", "attention_mask"), "logits")

    def activate_impl(self):
        self.model = self._model() if callable(self._model) and not isinstance(self._model, torch.nn.Module) else self._model
        self.model.eval()

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name in self.io.inputs:
            meta.add(name, np.int64, ("batch", "sequence"))
        return meta

    def infer_impl(self, feed_dict):
        with torch.no_grad():
            inputs = {name: torch.from_numpy(np.asarray(feed_dict[name])) for name in self.io.inputs}
            start = time.perf_counter()
            out = getattr(self.model(**inputs, **self.io.forward_kwargs()), self.io.output)
            self.inference_time = time.perf_counter() - start
        return OrderedDict({self.io.output: out.numpy()})

    def deactivate_impl(self):
        del self.model


def onnxruntime_session(path: Path, optimized_model_path: Path | None = None, threads: int = 0):
    """A CPU ONNX Runtime session; optionally saves the optimized graph it will execute."""
    ort = mod.lazy_import("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if optimized_model_path is not None:
        # EXTENDED (not ALL): the saved graph stays portable while holding the int8 QDQ fusions.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnxruntime_runner(path: Path, name: str | None = None) -> BaseRunner:
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(lambda: onnxruntime_session(path), name=name)
