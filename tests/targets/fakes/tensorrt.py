"""Test double of the `tensorrt` module (TensorRT 10/11 Python API), for `converter.targets.tensorrt`.

Names and signatures follow the TensorRT Python API reference (Builder, NetworkDefinitionCreationFlag,
OnnxParser, IBuilderConfig, IOptimizationProfile, ITimingCache, Runtime, ICudaEngine, EngineInspector).
Nothing is built: a "serialized engine" is JSON of what the builder config carried, and a timing cache
lists the builds that filled it, so a test can see what was passed from one call to the next.

A test sets `LAYERS` (the network the parser produces: `(name, LayerType, inputs, outputs)` with
`(tensor name, DataType)` pairs), `PARSE_ERRORS` and `INSPECTOR_LAYERS`, and reads `CALLS`.
As in TensorRT, the parser owns the network's weights: once the parser is freed the network refuses
to be read (`RuntimeError`), which makes use-after-free of the parse result observable.
"""

from __future__ import annotations

import enum
import json

__version__ = "10.13.3"
CALLS: list[tuple] = []  # (method, arguments) in call order
LAYERS: list[tuple] = []
PARSE_ERRORS: list[dict] = []  # {"node_name", "node", "node_operator", "desc"}
INSPECTOR_LAYERS: list[dict] = []


def reset() -> None:
    CALLS.clear()
    LAYERS.clear()
    PARSE_ERRORS.clear()
    INSPECTOR_LAYERS.clear()


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1  # TensorRT 10: kSTRONGLY_TYPED = 1 (kEXPLICIT_BATCH = 0 is deprecated)


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    INT64 = 11


float32, float16, int8, int32, int64 = DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.INT64


class LayerType(enum.Enum):
    CONSTANT = 0
    ELEMENTWISE = 1
    MATRIX_MULTIPLY = 2
    SHUFFLE = 3
    QUANTIZE = 4
    DEQUANTIZE = 5


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class ProfilingVerbosity(enum.Enum):
    LAYER_NAMES_ONLY = 0
    NONE = 1
    DETAILED = 2


class HardwareCompatibilityLevel(enum.Enum):
    NONE = 0
    AMPERE_PLUS = 1
    SAME_COMPUTE_CAPABILITY = 2


class BuilderFlag(enum.Enum):
    VERSION_COMPATIBLE = 0


class LayerInformationFormat(enum.Enum):
    ONELINE = 0
    JSON = 1


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = WARNING):
        self.min_severity = min_severity


class IHostMemory(bytes):
    """Serialized data: a buffer, as TensorRT's IHostMemory is."""

    @property
    def nbytes(self) -> int:
        return len(self)


class ITensor:
    def __init__(self, name: str, dtype: DataType):
        self.name, self.dtype = name, dtype


class ILayer:
    def __init__(self, name: str, type: LayerType, inputs: list[ITensor], outputs: list[ITensor]):
        self.name, self.type, self._inputs, self._outputs = name, type, inputs, outputs
        self.num_inputs, self.num_outputs = len(inputs), len(outputs)

    def get_input(self, index: int) -> ITensor:
        return self._inputs[index]

    def get_output(self, index: int) -> ITensor:
        return self._outputs[index]


class INetworkDefinition:
    def __init__(self, flags: int):
        self.flags = flags
        self._layers: list[ILayer] = []
        self._weights_alive = True  # False once the parser that owns the weights is freed

    def _check(self) -> None:
        if not self._weights_alive:
            raise RuntimeError("network read after its OnnxParser was freed (the parser owns the weights)")

    @property
    def num_layers(self) -> int:
        self._check()
        return len(self._layers)

    def get_layer(self, index: int) -> ILayer:
        self._check()
        return self._layers[index]


class ParserError:
    def __init__(self, error: dict):
        self._error = error

    def node_name(self) -> str:
        return self._error["node_name"]

    def node(self) -> int:
        return self._error["node"]

    def node_operator(self) -> str:
        return self._error["node_operator"]

    def desc(self) -> str:
        return self._error["desc"]


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger):
        CALLS.append(("OnnxParser", network))
        self._network = network

    def parse_from_file(self, model: str) -> bool:
        CALLS.append(("parse_from_file", model))
        tensors = {}

        def tensor(name, dtype):
            return tensors.setdefault(name, ITensor(name, dtype))

        for name, type, inputs, outputs in LAYERS:
            self._network._layers.append(ILayer(name, type, [tensor(*t) for t in inputs], [tensor(*t) for t in outputs]))
        return not PARSE_ERRORS

    @property
    def num_errors(self) -> int:
        return len(PARSE_ERRORS)

    def get_error(self, index: int) -> ParserError:
        return ParserError(PARSE_ERRORS[index])

    def __del__(self):
        self._network._weights_alive = False


class IOptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, input: str, min, opt, max) -> None:
        CALLS.append(("set_shape", input, tuple(min), tuple(opt), tuple(max)))
        self.shapes[input] = (list(min), list(opt), list(max))


class ITimingCache:
    """Its content here: the list of builds that timed tactics into it."""

    def __init__(self, builds: list[str]):
        self.builds = builds

    def serialize(self) -> IHostMemory:
        return IHostMemory(json.dumps(self.builds).encode())


class IBuilderConfig:
    def __init__(self):
        self.pools: dict = {}
        self.builder_optimization_level = 3
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY
        self.hardware_compatibility_level = HardwareCompatibilityLevel.NONE
        self.flags: set = set()
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        self.pools[pool] = pool_size

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def create_timing_cache(self, serialized_timing_cache) -> ITimingCache:
        data = bytes(serialized_timing_cache)
        CALLS.append(("create_timing_cache", data))
        return ITimingCache(json.loads(data) if data else [])

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        CALLS.append(("set_timing_cache", ignore_mismatch))
        self.timing_cache = cache
        return True


class Builder:
    def __init__(self, logger: Logger):
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        CALLS.append(("create_network", flags))
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        network._check()
        if config.timing_cache is not None:
            config.timing_cache.builds.append(f"build {sum(c[0] == 'build_serialized_network' for c in CALLS) + 1}")
        CALLS.append(("build_serialized_network", network.num_layers))
        return IHostMemory(json.dumps({
            "layers": network.num_layers,
            "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
            "builder_optimization_level": config.builder_optimization_level,
            "profiling_verbosity": config.profiling_verbosity.name,
            "hardware_compatibility_level": config.hardware_compatibility_level.name,
            "flags": sorted(f.name for f in config.flags),
            "profiles": [p.shapes for p in config.profiles],
        }).encode())


class EngineInspector:
    def get_engine_information(self, format: LayerInformationFormat) -> str:
        CALLS.append(("get_engine_information", format))
        return json.dumps({"Layers": INSPECTOR_LAYERS}) if format == LayerInformationFormat.JSON else ""


class ICudaEngine:
    def __init__(self, plan: dict):
        self.plan = plan

    def create_engine_inspector(self) -> EngineInspector:
        return EngineInspector()


class Runtime:
    def __init__(self, logger: Logger):
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine:
        CALLS.append(("deserialize_cuda_engine", self.engine_host_code_allowed))
        return ICudaEngine(json.loads(bytes(serialized_engine)))
