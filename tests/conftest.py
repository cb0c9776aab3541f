from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models

CALIBRATION_TEXT = ROOT / "recipes" / "data" / "gpl-3.0.txt"
EVALUATION_TEXT = ROOT / "recipes" / "data" / "apache-2.0.txt"


@pytest.fixture(scope="session", autouse=True)
def stage_cache_dir(tmp_path_factory):
    """One stage cache for the session (never the user's): content-addressed, so tests share it safely."""
    import os

    from converter.cache import ENV_DIR

    path = tmp_path_factory.mktemp("stage-cache")
    previous = os.environ.get(ENV_DIR)
    os.environ[ENV_DIR] = str(path)
    yield path
    if previous is None:
        os.environ.pop(ENV_DIR, None)
    else:
        os.environ[ENV_DIR] = previous


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """arch -> HF folder of a tiny model with planted outliers and a tokenizer (built once)."""
    from tiny_models import TINY_CONFIGS, save_tiny_checkpoint

    base = tmp_path_factory.mktemp("checkpoints")
    text = CALIBRATION_TEXT.read_text()
    return {arch: save_tiny_checkpoint(arch, base / arch, text) for arch in TINY_CONFIGS}


def tiny_recipe_dict(checkpoint: Path, version: str = "1") -> dict:
    return {
        "schema_version": 1,
        "source": {"path": str(checkpoint)},
        "calibration": {"files": [str(CALIBRATION_TEXT)], "seq_len": 64, "num_samples": 8, "batch_size": 4},
        "smoothing": {"alpha": 0.5},
        "parity": {"eval": {"files": [str(EVALUATION_TEXT)], "seq_len": 64, "num_samples": 4, "batch_size": 2}},
        "output": {"name": "tiny-w8a8", "version": version},
    }


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(dict) -> path of a YAML recipe in a fresh temp folder."""

    def write(data: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write
