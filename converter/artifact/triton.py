"""Triton Inference Server model repositories: `<repo>/<model>/config.pbtxt` + `<repo>/<model>/<N>/`.

Every config is built as a `ModelConfig` protobuf message (the schema Triton itself reads, shipped in
`tritonclient`), printed with protobuf's text format, and parsed back strictly before anything is
published, so a config that Triton would reject never leaves this module. Names, data types and dims
come from the exported ONNX graph, never from constants.

One Triton model per serving backend of an artifact:
  * ONNX Runtime targets -> `<prefix>-<target>`, platform `onnxruntime_onnx`, `model.onnx` (a folder
    `model.onnx/` holding the graph and its external data when the weights are external);
  * TensorRT targets -> one model `<prefix>-tensorrt`, platform `tensorrt_plan`, one plan per compute
    capability (`model_sm80.plan`, ...) chosen by Triton through `cc_model_filenames`;
  * a KV-cache decoder -> also `<prefix>-generate`, a python-backend model that keeps the cache in
    the server and streams greedy tokens (converter/artifact/triton_generate/), whatever its targets.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from converter import scratch
from converter.artifact import triton_generate
from converter.errors import UserError, check_writable_folder
from converter.targets.registry import TARGETS

CONFIG = "config.pbtxt"
_PACKAGE = Path(__file__).resolve().parent
REPOSITORY = "triton"  # folder inside an artifact
# Each target says how Triton serves it (`Target.triton_platform`, `triton_kind`); a target Triton
# cannot serve says why (`triton_refusal`), and is reported as skipped, not silently dropped.
PLATFORMS = {t.backend: t.triton_platform for t in TARGETS.values() if t.triton_platform}
PYTHON = "python"  # the generate model's backend (a `backend`, not a `platform`, in its config)
KINDS = {t.backend: t.triton_kind for t in TARGETS.values() if t.triton_platform}
UNSERVED_BACKENDS = {t.backend: t.triton_refusal for t in TARGETS.values() if not t.triton_platform}


class TritonConfigError(UserError):
    """A config.pbtxt that Triton would reject, or whose I/O does not match the model's graph."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output: Triton data type name (TYPE_*) and full dims (-1 = dynamic)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass
class ModelSpec:
    """What one Triton model needs: its files (name in the version folder -> source) and I/O."""

    name: str
    backend: str
    version: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: dict[str, Path]
    cc_model_filenames: dict[str, str] = field(default_factory=dict)
    onnx_sha256: str = ""
    settings: object = None  # the recipe's `triton` section
    max_batch: int = 0  # python (generate) models: sequences per decode step


def _triton_dtype(elem_type: int, where: str) -> str:
    from onnx.helper import tensor_dtype_to_np_dtype
    from tritonclient.utils import np_to_triton_dtype

    try:
        name = np_to_triton_dtype(tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError):
        name = None
    if name is None:
        raise TritonConfigError(f"{where}: ONNX element type {elem_type} has no Triton data type")
    return f"TYPE_{name}"


def graph_io(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph (initializers excluded), as Triton sees them.

    Raises:
        TritonConfigError: an element type Triton cannot carry.
    """
    from converter.export.kv_graph import graph_signature

    inputs, outputs = graph_signature(model_path)

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(value.name, _triton_dtype(t.elem_type, f"{model_path.name}: {value.name}"), dims)

    return [spec(v) for v in inputs], [spec(v) for v in outputs]


def effective_max_batch_size(spec: ModelSpec, requested: int) -> int:
    """`requested` when every input and output has a dynamic leading (batch) axis, else 0."""
    batched = all(t.dims and t.dims[0] == -1 for t in (*spec.inputs, *spec.outputs))
    return requested if batched else 0


def model_config(spec: ModelSpec, settings) -> object:
    """The `ModelConfig` message for `spec`.

    Args:
        settings: the recipe's `triton` section (max_batch_size, dynamic_batching, instance_count,
            intra_op_thread_count).

    Returns:
        A `tritonclient.grpc.model_config_pb2.ModelConfig`.
    """
    from tritonclient.grpc import model_config_pb2 as pb

    if spec.backend == PYTHON:
        return triton_generate.model_config(spec)
    max_batch = effective_max_batch_size(spec, settings.max_batch_size)
    config = pb.ModelConfig(name=spec.name, platform=PLATFORMS[spec.backend], max_batch_size=max_batch)
    for tensors, add in ((spec.inputs, config.input.add), (spec.outputs, config.output.add)):
        for t in tensors:
            entry = add()
            entry.name, entry.data_type = t.name, pb.DataType.Value(t.data_type)
            entry.dims.extend(t.dims[1:] if max_batch > 0 else t.dims)  # Triton adds the batch axis itself
    group = config.instance_group.add()
    group.count, group.kind = settings.instance_count, pb.ModelInstanceGroup.Kind.Value(KINDS[spec.backend])
    for cc, filename in sorted(spec.cc_model_filenames.items()):
        config.cc_model_filenames[cc] = filename
    for key, value in backend_parameters(spec.backend, settings).items():
        config.parameters[key].string_value = value
    if max_batch > 0 and settings.dynamic_batching.enabled:
        config.dynamic_batching.max_queue_delay_microseconds = settings.dynamic_batching.max_queue_delay_microseconds
        config.dynamic_batching.preferred_batch_size.extend(settings.dynamic_batching.preferred_batch_size)
    return config


def backend_parameters(backend: str, settings) -> dict[str, str]:
    """The `parameters` of a model config: the ONNX Runtime backend's thread count, when the recipe sets one."""
    if backend == "onnxruntime" and getattr(settings, "intra_op_thread_count", 0):
        return {"intra_op_thread_count": str(settings.intra_op_thread_count)}
    return {}


def render(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_config(text: str, where: str):
    """Parse config.pbtxt text strictly (unknown fields, bad enums and syntax errors are errors).

    Raises:
        TritonConfigError: naming `where` and the parser's message.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as exc:
        raise TritonConfigError(f"{where}: not a valid Triton ModelConfig ({exc})") from None


def check_config(config, spec: ModelSpec) -> list[str]:
    """Differences between a parsed config and what the model's graph and files require."""
    from tritonclient.grpc import model_config_pb2 as pb

    if spec.backend == PYTHON:  # no graph to check against: the whole config must be what was built
        expected = triton_generate.model_config(spec)
        return [] if config == expected else [f"differs from the generate model's config: {render(config)!r} "
                                              f"instead of {render(expected)!r}"]
    problems = []
    if config.name != spec.name:
        problems.append(f"name is {config.name!r}, expected {spec.name!r} (the folder name)")
    if config.platform != PLATFORMS[spec.backend]:
        problems.append(f"platform is {config.platform!r}, expected {PLATFORMS[spec.backend]!r}")
    batched = config.max_batch_size > 0
    if batched and effective_max_batch_size(spec, 1) == 0:
        problems.append(f"max_batch_size is {config.max_batch_size} but the graph's batch axis is fixed")
    for kind, declared, tensors in (("input", config.input, spec.inputs), ("output", config.output, spec.outputs)):
        expected = {t.name: (t.data_type, list(t.dims[1:] if batched else t.dims)) for t in tensors}
        actual = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in declared}
        for name in sorted(expected.keys() | actual.keys()):
            if name not in actual:
                problems.append(f"{kind} {name} of the graph is missing")
            elif name not in expected:
                problems.append(f"{kind} {name} is not in the graph")
            elif actual[name] != expected[name]:
                problems.append(f"{kind} {name} is {actual[name][0]} {actual[name][1]}, graph has "
                                f"{expected[name][0]} {expected[name][1]}")
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    if parameters != backend_parameters(spec.backend, spec.settings):
        problems.append(f"parameters {parameters}, expected {backend_parameters(spec.backend, spec.settings)}")
    if dict(config.cc_model_filenames) != spec.cc_model_filenames:
        problems.append(f"cc_model_filenames {dict(config.cc_model_filenames)}, expected {spec.cc_model_filenames}")
    return problems


def validated_config_text(spec: ModelSpec, settings) -> str:
    """Render the config, parse it back strictly and check it against the graph.

    Raises:
        TritonConfigError: the round trip or the I/O check failed (a bug here, or a graph Triton
            cannot serve); nothing has been written yet.
    """
    text = render(model_config(spec, settings))
    problems = check_config(parse_config(text, f"{spec.name}/{CONFIG}"), spec)
    if problems:
        raise TritonConfigError(f"{spec.name}/{CONFIG}: {'; '.join(problems)}")
    return text


def _place(source: Path, dest: Path, link: bool) -> None:
    """Hard-link (no second copy on disk) or copy one file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(source, dest)
            return
        except OSError:  # another file system, or links not allowed
            pass
    shutil.copy2(source, dest)


def write_model(repo: Path, spec: ModelSpec, link: bool = False) -> Path:
    """Write or replace `<repo>/<model>/config.pbtxt` and `<repo>/<model>/<version>/` atomically.

    Other version folders of the model are left alone, so a repository can be updated in place.

    Args:
        link: hard-link the model files (inside an artifact, where both copies are hashed and
            immutable); a repository outside gets copies, so editing it cannot change an artifact.

    Returns:
        The model folder.
    """
    text = validated_config_text(spec, spec.settings)
    model_dir = repo / spec.name
    model_dir.mkdir(parents=True, exist_ok=True)
    # Staged inside the model folder: Triton ignores non-numeric folders there, but would try to load
    # a stray folder at the repository root as a model.
    with scratch.folder(model_dir, ".staging-", mode=0o755) as staging:
        for filename, source in spec.files.items():  # the generate model's source is copied, never linked
            _place(source, staging / filename, link and not source.is_relative_to(_PACKAGE))
        scratch.replace(staging, model_dir / str(spec.version))
        config_tmp = model_dir / f".{CONFIG}.tmp"
        config_tmp.write_text(text)
        config_tmp.replace(model_dir / CONFIG)
    return model_dir


def validate_repository(repo: Path, specs: list[ModelSpec]) -> list[str]:
    """Re-read every model's config.pbtxt strictly, check its I/O and that its files exist."""
    problems = []
    for spec in specs:
        path = repo / spec.name / CONFIG
        if not path.is_file():
            problems.append(f"{spec.name}: no {CONFIG}")
            continue
        try:
            config = parse_config(path.read_text(), f"{spec.name}/{CONFIG}")
        except TritonConfigError as exc:
            problems.append(str(exc))
            continue
        problems += [f"{spec.name}/{CONFIG}: {p}" for p in check_config(config, spec)]
        problems += [f"{spec.name}/{spec.version}/{f}: missing" for f in spec.files
                     if not (repo / spec.name / str(spec.version) / f).exists()]
    return problems


def triton_version(manifest: dict) -> int:
    """The numeric Triton version of an artifact: its build number, else a numeric recipe version, else 1."""
    build = manifest.get("build") or {}
    if build.get("triton_version"):
        return int(build["triton_version"])
    version = str(manifest.get("version", ""))
    return int(version) if version.isdigit() and int(version) > 0 else 1


def _onnx_files(folder: Path, manifest: dict) -> dict[str, Path]:
    model = manifest["model"]["file"]
    if not manifest["model"].get("external_data"):
        return {"model.onnx": folder / model}
    # Triton's ONNX Runtime backend loads `model.onnx/model.onnx` and finds the weights beside it.
    data = [p for p in sorted(folder.glob(f"{model}.data*")) if p.is_file()]
    return {f"model.onnx/{p.name}": p for p in (folder / model, *data)}


def artifact_models(folder: Path, manifest: dict, version: int | None = None) -> tuple[list[ModelSpec], dict[str, str]]:
    """The Triton models an artifact's targets provide, and the targets that provide none (with why).

    Raises:
        UserError: a TensorRT target whose manifest entry lacks a compute capability, or whose engine
            file is missing.
    """
    from converter.recipe import Triton

    settings = Triton.model_validate(manifest["recipe"].get("triton", {}))
    prefix = settings.model_name or manifest["name"]
    version = version or triton_version(manifest)
    model_path = folder / manifest["model"]["file"]
    inputs, outputs = graph_io(model_path)
    onnx_sha = manifest.get("files", {}).get(manifest["model"]["file"], "")
    specs: dict[str, ModelSpec] = {}
    skipped: dict[str, str] = {}
    for target, entry in manifest["targets"].items():
        build = entry["build"]
        backend = build.get("backend")
        if backend in UNSERVED_BACKENDS:
            skipped[target] = UNSERVED_BACKENDS[backend]
            continue
        if backend not in PLATFORMS:
            skipped[target] = f"backend {backend!r} has no Triton platform here"
            continue
        if backend == "onnxruntime":
            name = f"{prefix}-{target}"
            specs[name] = ModelSpec(name, backend, version, inputs, outputs, _onnx_files(folder, manifest),
                                    onnx_sha256=onnx_sha, settings=settings)
            continue
        if not build.get("engine_file"):
            skipped[target] = "no engine built (dry run)"
            continue
        cc = build.get("compute_capability")
        engine = folder / build["engine_file"]
        if not cc or not engine.is_file():
            raise UserError(f"{folder}: target {target} needs compute_capability and an engine file "
                            f"(got {cc!r}, {build['engine_file']!r} {'present' if engine.is_file() else 'missing'})")
        name = f"{prefix}-tensorrt"
        spec = specs.setdefault(name, ModelSpec(name, backend, version, inputs, outputs, {}, onnx_sha256=onnx_sha,
                                                          settings=settings))
        plan = f"model_sm{str(cc).replace('.', '')}.plan"
        spec.files[plan] = engine
        spec.cc_model_filenames[str(cc)] = plan
    why = triton_generate.unservable(manifest)
    if why is None:
        name = f"{prefix}-{triton_generate.SUFFIX}"
        specs[name] = ModelSpec(name, PYTHON, version, [], [], triton_generate.files(folder, manifest),
                                onnx_sha256=onnx_sha, settings=settings,
                                max_batch=triton_generate.batch_limit(manifest))
    elif manifest.get("model", {}).get("kind") == "decoder":
        skipped[triton_generate.SUFFIX] = why
    return list(specs.values()), skipped


def merge_specs(groups: list[list[ModelSpec]]) -> list[ModelSpec]:
    """Combine the models of several artifacts: TensorRT plans for different compute capabilities of
    one model and version merge into one Triton model.

    Raises:
        UserError: two artifacts give the same model and version from different ONNX graphs, or the
            same compute capability twice.
    """
    merged: dict[tuple[str, int], ModelSpec] = {}
    for spec in (s for group in groups for s in group):
        key = (spec.name, spec.version)
        if key not in merged:
            merged[key] = ModelSpec(**{**spec.__dict__, "files": dict(spec.files),
                                       "cc_model_filenames": dict(spec.cc_model_filenames)})
            continue
        into = merged[key]
        if into.onnx_sha256 != spec.onnx_sha256:
            raise UserError(f"Triton model {spec.name} version {spec.version}: artifacts were built from "
                            f"different ONNX models ({into.onnx_sha256[:12]} vs {spec.onnx_sha256[:12]})")
        if into.settings != spec.settings:
            raise UserError(f"Triton model {spec.name}: artifacts disagree on the recipe's triton section")
        twice = sorted(into.cc_model_filenames.keys() & spec.cc_model_filenames.keys())
        if twice:
            raise UserError(f"Triton model {spec.name} version {spec.version}: compute capability {twice} "
                            "comes from more than one artifact")
        into.files.update(spec.files)
        into.cc_model_filenames.update(spec.cc_model_filenames)
    names = {}
    for name, version in merged:
        if name in names:
            raise UserError(f"Triton model {name}: artifacts give versions {names[name]} and {version}; "
                            "assemble one version per run")
        names[name] = version
    return list(merged.values())


def assemble(artifacts: list[Path], repo: Path, version: int | None = None) -> dict:
    """Build or update a Triton repository from published artifacts, without rebuilding anything.

    Each artifact is re-hashed against its manifest first: a corrupted artifact is refused.

    Returns:
        {"models": {name: {"version", "platform", "files"}}, "skipped": {"<artifact>:<target>": why}}.

    Raises:
        UserError: not an artifact, files that do not match the manifest, conflicting artifacts.
        TritonConfigError: a config that fails strict parsing or the I/O check.
    """
    from converter.artifact.package import read_manifest, verify

    check_writable_folder(repo, "--repo")
    groups, skipped = [], {}
    for folder in artifacts:
        problems = verify(folder)
        if problems:
            raise UserError(f"{folder}: {len(problems)} file(s) do not match the manifest: {'; '.join(problems[:5])}")
        manifest = read_manifest(folder)
        specs, why = artifact_models(folder, manifest, version)
        groups.append(specs)
        skipped.update({f"{folder}:{target}": reason for target, reason in why.items()})
    specs = merge_specs(groups)
    for spec in specs:
        write_model(repo, spec)
    problems = validate_repository(repo, specs)
    if problems:
        raise TritonConfigError(f"{repo}: {'; '.join(problems)}")
    return {"models": summary(specs), "skipped": skipped}


def summary(specs: list[ModelSpec]) -> dict:
    return {s.name: {"version": s.version, **({"backend": PYTHON} if s.backend == PYTHON else
                                              {"platform": PLATFORMS[s.backend]}), "files": sorted(s.files),
                     **({"cc_model_filenames": s.cc_model_filenames} if s.cc_model_filenames else {})}
            for s in specs}


def write_artifact_repository(folder: Path, manifest: dict) -> dict:
    """Write `<artifact>/triton/` for the artifact's targets and validate it (called before publishing).

    Returns:
        The manifest's `triton` record: repository folder, models, skipped targets with the reason.

    Raises:
        TritonConfigError: a generated config fails strict parsing or does not match the graph.
    """
    specs, skipped = artifact_models(folder, manifest)
    repo = folder / REPOSITORY
    for spec in specs:
        write_model(repo, spec, link=True)
    problems = validate_repository(repo, specs)
    if problems:
        raise TritonConfigError(f"{repo}: {'; '.join(problems)}")
    return {"repository": REPOSITORY, "models": summary(specs), "skipped": skipped}


def verify_artifact_repository(folder: Path, manifest: dict) -> list[str]:
    """Re-parse an artifact's Triton configs strictly and re-check them against its graph."""
    if "triton" not in manifest:
        return []
    specs, _ = artifact_models(folder, manifest)
    # the models the artifact was published with: one written before the generate model has none
    published = manifest["triton"].get("models", {})
    return validate_repository(folder / manifest["triton"]["repository"], [s for s in specs if s.name in published])
