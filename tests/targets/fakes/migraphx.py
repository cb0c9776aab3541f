"""Test double of the `migraphx` Python module (ROCm MIGraphX), for `converter.targets.migraphx`.

Names and signatures follow MIGraphX's Python bindings (`parse_onnx`, `program.compile /
get_parameter_shapes / run`, `get_target`, `save`, `load`, `argument`, `shape`). A "program" keeps
the ONNX file it was parsed from and the input sizes it was given; `run` refuses arguments whose
shape or type differ from the program's parameters, as MIGraphX's `program::eval` does, then
computes the outputs with ONNX Runtime on the same graph. `str(program)` of a compiled program is
`LISTING`, which a test sets. Every call is recorded in `CALLS`.
"""

from __future__ import annotations

import json

import numpy as np

CALLS: list[tuple] = []
LISTING = ""  # what `str(program)` prints once compiled


def reset() -> None:
    global LISTING
    CALLS.clear()
    LISTING = ""


class shape:  # noqa: N801 (the module's own name)
    def __init__(self, type: str, lens: list[int]):
        self._type, self._lens = type, list(lens)

    def type_string(self) -> str:
        return self._type

    def lens(self) -> list[int]:
        return list(self._lens)

    def __eq__(self, other) -> bool:
        return (self._type, self._lens) == (other._type, other._lens)

    def __repr__(self) -> str:
        return f"{self._type}, {self._lens}"


def _shape_of(array: np.ndarray) -> shape:
    name = {"float32": "float", "float16": "half", "float64": "double"}.get(array.dtype.name, array.dtype.name)
    return shape(f"{name}_type", list(array.shape))


class argument:  # noqa: N801
    def __init__(self, data):
        self._array = np.asarray(data)

    def get_shape(self) -> shape:
        return _shape_of(self._array)

    def __array__(self, dtype=None, copy=None):
        return self._array if dtype is None else self._array.astype(dtype)


class target:  # noqa: N801
    def __init__(self, name: str):
        self.name = name


def get_target(name: str) -> target:
    CALLS.append(("get_target", name))
    return target(name)


class program:  # noqa: N801
    def __init__(self, onnx_file: str, parameters: dict[str, shape], compiled: bool = False):
        self.onnx_file, self.parameters, self.compiled = onnx_file, parameters, compiled

    def get_parameter_shapes(self) -> dict[str, shape]:
        return dict(self.parameters)

    def is_compiled(self) -> bool:
        return self.compiled

    def compile(self, t: target, offload_copy: bool = True, fast_math: bool = True, exhaustive_tune: bool = False):
        CALLS.append(("compile", t.name, offload_copy, fast_math, exhaustive_tune))
        self.compiled = True

    def run(self, params: dict) -> list[argument]:
        import onnxruntime as ort

        CALLS.append(("run", {name: list(np.asarray(a).shape) for name, a in params.items()}))
        for name, expected in self.parameters.items():
            if name not in params:
                raise RuntimeError(f"Parameter not found: {name}")
            got = _shape_of(np.asarray(params[name]))
            if got != expected:
                raise RuntimeError(f"Incorrect shape {{{got}}} for parameter: {name} (program: {{{expected}}})")
        session = ort.InferenceSession(self.onnx_file, providers=["CPUExecutionProvider"])
        return [argument(o) for o in session.run(None, {n: np.asarray(a) for n, a in params.items()})]

    def __str__(self) -> str:
        return LISTING if self.compiled else ""


def parse_onnx(filename: str, default_dim_value: int = 0, default_dyn_dim_value=None, map_input_dims=None,
               map_dyn_input_dims=None, skip_unknown_operators: bool = False, print_program_on_error: bool = False,
               max_loop_iterations: int = 10, limit_max_iterations: int = 65535) -> program:
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    map_input_dims = dict(map_input_dims or {})
    CALLS.append(("parse_onnx", filename, map_input_dims))
    graph = onnx.load(filename, load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    parameters = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        lens = map_input_dims.get(value.name) or [d or default_dim_value or 1 for d in dims]
        dtype = np.dtype(tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        parameters[value.name] = shape(_shape_of(np.zeros(0, dtype)).type_string(), lens)
    return program(filename, parameters)


def save(p: program, filename: str, format: str = "msgpack") -> None:
    CALLS.append(("save", filename, format))
    data = {"onnx_file": p.onnx_file, "compiled": p.compiled,
            "parameters": {n: [s.type_string(), s.lens()] for n, s in p.parameters.items()}}
    with open(filename, "w") as f:
        json.dump(data, f)


def load(filename: str, format: str = "msgpack") -> program:
    CALLS.append(("load", filename, format))
    with open(filename) as f:
        data = json.load(f)
    return program(data["onnx_file"], {n: shape(t, lens) for n, (t, lens) in data["parameters"].items()},
                   data["compiled"])
