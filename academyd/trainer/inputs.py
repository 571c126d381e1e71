"""The spec's inputs, checked before anything heavy is imported (no torch here): datasets and base model."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from academyd.trainer import spec as S
from academyd.trainer.data import DataError, read_examples
from academyd.trainer.errors import BadInput

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_base_model(base_model: str) -> str:
    """Return 'gguf', 'local' or 'cache'; raise BadInput when the model cannot be loaded offline."""
    from academyd.basemodel import BUILTIN_NAME, BaseModelError, resolve_base

    path = Path(base_model).expanduser()
    if base_model == BUILTIN_NAME or (path.is_file() and path.suffix.lower() == ".gguf"):
        try:
            resolve_base(base_model, trainer_python=Path(sys.executable))
        except BaseModelError as exc:
            raise BadInput(str(exc)) from None
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadInput(f"base model directory {path} has no config.json; point base_model at a "
                           "save_pretrained directory")
        return "local"
    if path.exists() or not _HUB_NAME.match(base_model) or base_model.startswith((".", "/", "~")):
        raise BadInput(f"base model path {base_model} does not exist; give a model directory "
                       "(a save_pretrained directory or a GGUF file) or a cached hub name")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(base_model, "config.json"), str):
        raise BadInput(f"base model {base_model} is not a local directory and not in the Hugging Face cache "
                       f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); downloads are disabled: "
                       "copy the model into the cache or a directory and give that path")
    return "cache"


def check_inputs(spec: S.TrainSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read the datasets and check the base model before anything heavy is imported."""
    try:
        train = read_examples(spec.dataset_path, spec.format, what="dataset")
        heldout = read_examples(spec.heldout_path, spec.format, what="held-out set") if spec.heldout_path else []
    except DataError as exc:
        raise BadInput(str(exc)) from None
    check_base_model(spec.base_model)
    return train, heldout

