import json

import pytest
import torch
from safetensors.torch import save_file

from converter.errors import UserError
from converter.models.load import load
from converter.recipe import load_recipe
from conftest import tiny_recipe_dict


def test_loads_tiny_checkpoint_and_hashes_files(tiny_checkpoints, write_recipe):
    loaded = load(load_recipe(write_recipe(tiny_recipe_dict(tiny_checkpoints["qwen2"]))))
    assert loaded.architecture == "Qwen2ForCausalLM"
    assert not loaded.model.training
    assert "model.safetensors" in loaded.files and len(loaded.checkpoint_sha256) == 64


def test_missing_folder(tmp_path, write_recipe):
    with pytest.raises(UserError, match="does not exist"):
        load(load_recipe(write_recipe(tiny_recipe_dict(tmp_path / "nope"))))


def _folder(tmp_path, architecture="LlamaForCausalLM", weights="pytorch_model.bin"):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "llama"}))
    if weights.endswith(".bin"):
        torch.save({"x": torch.zeros(1)}, folder / weights)
    else:
        save_file({"x": torch.zeros(1)}, folder / weights)
    return folder


def test_pickle_only_checkpoint_is_refused(tmp_path, write_recipe):
    folder = _folder(tmp_path)
    with pytest.raises(UserError, match=r"only pickle weights.*allow_pickle"):
        load(load_recipe(write_recipe(tiny_recipe_dict(folder))))


def test_unsupported_architecture_refused_before_loading_weights(tmp_path, write_recipe):
    folder = _folder(tmp_path, architecture="GPTJForCausalLM", weights="model.safetensors")
    with pytest.raises(UserError, match=r"architecture GPTJForCausalLM is not supported; supported: .*LlamaForCausalLM.*architecture:"):
        load(load_recipe(write_recipe(tiny_recipe_dict(folder))))


def test_pickle_allowed_when_recipe_says_so(tiny_checkpoints, tmp_path, write_recipe):
    from transformers import AutoModelForCausalLM

    source = tiny_checkpoints["llama"]
    model = AutoModelForCausalLM.from_pretrained(source)
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    data = tiny_recipe_dict(folder)
    with pytest.raises(UserError, match="pickle"):
        load(load_recipe(write_recipe(data)))
    data["source"]["allow_pickle"] = True
    loaded = load(load_recipe(write_recipe(data)))
    assert torch.equal(loaded.model.lm_head.weight, model.lm_head.weight)
    assert "pytorch_model.bin" in loaded.files


@pytest.mark.parametrize("damage, message", [
    ("missing", r"weights model\.layers\.1\.mlp\.up_proj\.weight are missing \(transformers would fill them at random\)"),
    ("reshaped", r"weights model\.layers\.0\.self_attn\.o_proj\.weight have a different shape than config\.json builds"),
    ("truncated", r"could not be loaded: Error while deserializing header"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_weights(tiny_checkpoints, tmp_path, write_recipe, damage, message):
    # transformers itself only warns about missing weights and fills them at random
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "damaged"
    shutil.copytree(tiny_checkpoints["llama"], folder)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    if damage == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif damage == "reshaped":
        tensors["model.layers.0.self_attn.o_proj.weight"] = tensors["model.layers.0.self_attn.o_proj.weight"][:, :-1].clone()
    save_file(tensors, weights, metadata={"format": "pt"})
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(UserError, match=message):
        load(load_recipe(write_recipe(tiny_recipe_dict(folder))))


def test_evaluation_files_that_are_calibration_files_under_any_name_are_found(tiny_checkpoints, tmp_path, write_recipe):
    from conftest import CALIBRATION_TEXT

    from converter.models.text import shared_files

    renamed = tmp_path / "renamed.txt"
    renamed.write_bytes(CALIBRATION_TEXT.read_bytes())
    data = tiny_recipe_dict(tiny_checkpoints["llama"])
    held_out = data["parity"]["eval"]["files"]
    data["parity"]["eval"]["files"] = [*held_out, str(renamed)]
    r = load_recipe(write_recipe(data))
    assert shared_files(r, r.recipe.calibration, r.recipe.parity.eval) == [str(renamed)]
    data["parity"]["eval"]["files"] = held_out
    r = load_recipe(write_recipe(data))
    assert shared_files(r, r.recipe.calibration, r.recipe.parity.eval) == []


def test_a_lora_adapter_folder_is_refused_with_how_to_merge_it(tmp_path, write_recipe):
    folder = tmp_path / "adapter"  # what a LoRA fine-tune saves: the adapter, not the model
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16,
                                                            "base_model_name_or_path": "Qwen/Qwen2.5-3B"}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(16, 8)},
              folder / "adapter_model.safetensors")
    with pytest.raises(UserError, match=r"is a PEFT adapter \(adapter_config.json\), not a model: merge it into its "
                                        r"base model Qwen/Qwen2.5-3B first \(peft: .*merge_and_unload"):
        load(load_recipe(write_recipe(tiny_recipe_dict(folder))))


def test_a_weights_file_given_as_the_checkpoint_folder_is_named(tiny_checkpoints, write_recipe):
    weights = tiny_checkpoints["llama"] / "model.safetensors"
    with pytest.raises(UserError, match=r"source\.path .*model\.safetensors is a file; give the checkpoint folder"):
        load(load_recipe(write_recipe(tiny_recipe_dict(weights))))


def test_a_concurrent_materialization_that_finishes_first_leaves_one_complete_folder(tmp_path, monkeypatch):
    """Two runs materializing a packaged model at once (CI jobs sharing a checkout) both succeed:
    the one that renames second finds a complete folder in place and drops its own copy."""
    from converter.models import pypi_models as packaged

    dest = tmp_path / "models" / "all-MiniLM-L6-v2"
    copy = packaged._copy_folder

    def copy_while_another_run_finishes(source, staging):
        copy(source, staging)
        dest.mkdir()
        copy(source, dest)  # the other run's folder lands first

    monkeypatch.setattr(packaged, "_copy_folder", copy_while_another_run_finishes)
    assert packaged.materialize("all-minilm-l6-v2", dest) == dest
    assert [p.name for p in dest.parent.iterdir()] == ["all-MiniLM-L6-v2"]  # no staging folder left
    assert (dest / "config.json").is_file() and (dest / "model.safetensors").is_file()
