"""The target registry: every deployment target by name, one line each.

Adding a target: a module with its builder, runner and a `target(...)` constructor (see
`onnxruntime.py`), and one line here. Backend libraries import lazily inside the builders and
runners, so a target whose libraries are missing only fails when it is selected.
"""

from __future__ import annotations

from converter.targets import migraphx, onnxruntime, tensorrt
from converter.targets.base import Target

_SELF_HOSTED = ("self-hosted", "linux", "x64")  # GitHub-hosted runners have no GPUs

TARGETS: dict[str, Target] = {t.name: t for t in (
    onnxruntime.target("cpu-onnxruntime", "x86-64 / arm64 CPU (int8 kernels: VNNI, AMX, NEON dot product)",
                       ci_labels=("ubuntu-latest",)),
    tensorrt.target("a100-tensorrt", ci_labels=(*_SELF_HOSTED, "gpu-a100")),
    tensorrt.target("h100-tensorrt", ci_labels=(*_SELF_HOSTED, "gpu-h100")),
    migraphx.target("mi250x-migraphx", ci_labels=(*_SELF_HOSTED, "gpu-mi250x")),
    migraphx.target("mi300-migraphx", ci_labels=(*_SELF_HOSTED, "gpu-mi300")),
)}
