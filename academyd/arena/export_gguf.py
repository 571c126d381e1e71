"""Write a PEFT LoRA adapter as a GGUF LoRA adapter (what llama.cpp and Ollama's ADAPTER load).

    python -m academyd.arena.export_gguf ADAPTER_DIR OUT.gguf --base BASE    # a .gguf, a directory, a name
    python -m academyd.arena.export_gguf ADAPTER_DIR OUT.gguf --base-config CONFIG.json   # no identity

Runs in the trainer's environment (torch for any dtype in the safetensors, the `gguf` package). The
layout follows llama.cpp's `convert_lora_to_gguf.py`: `general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha`, and for every adapted weight two tensors `<gguf name>.lora_a` (r x in) and
`<gguf name>.lora_b` (out x r). For the llama family the q and k projections are stored permuted in GGUF
(llama.cpp's rotary layout), so their `lora_b` rows are permuted the same way.

Supported `model_type`s: llama, mistral (llama layout), qwen2, qwen3. Anything else exits 2 with the
reason: the promotion then ships the safetensors adapter alone. Prints one JSON line:
{"path", "arch", "tensors", "alpha", "rank", "base_sha256"}.

Base identity: with `--base`, the adapter records the base it was trained on: GGUF's
`general.base_model.count`/`general.base_model.0.name`/`.organization`, and `academy.base_model.sha256`
(the sha256 of the base GGUF or directory manifest, `academyd.basemodel`), `academy.base_model.file`, and
`academy.chat_template` (the template it was trained with). `academyd.basemodel.check_adapter_base` checks
it. The base recorded in the adapter directory (`academy_base.json`, written by the trainer) must be the
`--base` given, else exit 2 naming both.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from academyd.trainer import spec as S

# model_type -> (gguf architecture name, q/k rows permuted like llama.cpp does)
ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


class ExportError(ValueError):
    """The adapter cannot be written as GGUF; the message says why."""


def permute_rows(w: Any, n_head: int) -> Any:
    """llama.cpp's `LlamaModel.permute` on the output dimension (rows) of a (out x r) matrix."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export(adapter_dir: Path, out_path: Path, base_config: dict[str, Any],
           identity: dict[str, Any] | None = None, chat_template: str | None = None) -> dict[str, Any]:
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    model_type = base_config.get("model_type")
    if model_type not in ARCHES:
        raise ExportError(f"model_type {model_type!r} is not supported for GGUF export "
                          f"(supported: {', '.join(sorted(ARCHES))})")
    arch_name, permute = ARCHES[model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_blocks = int(base_config["num_hidden_layers"])
    n_head = int(base_config["num_attention_heads"])
    n_kv = int(base_config.get("num_key_value_heads") or n_head)
    names = gguf.get_tensor_name_map(arch, n_blocks)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise ExportError(f"{weights_path} does not exist (only safetensors adapters are exported)")
    state = load_file(str(weights_path))
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        m = _LORA.match(key)
        if m is None:
            raise ExportError(f"unexpected tensor {key} in the adapter (only LoRA A/B weights are supported)")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor.float().numpy()
    writer = gguf.GGUFWriter(str(out_path), arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.get("lora_alpha", cfg.get("r", 8))))
    if identity:
        from academyd.basemodel import KEY_BASE_FILE, KEY_BASE_SHA256, KEY_CHAT_TEMPLATE

        writer.add_uint32(gguf.Keys.General.BASE_MODEL_COUNT, 1)
        writer.add_string(gguf.Keys.General.BASE_MODEL_NAME.format(id=0), str(identity.get("name") or ""))
        if identity.get("organization"):
            writer.add_string(gguf.Keys.General.BASE_MODEL_ORGANIZATION.format(id=0), str(identity["organization"]))
        writer.add_string(KEY_BASE_SHA256, str(identity["sha256"]))
        writer.add_string(KEY_BASE_FILE, Path(str(identity.get("gguf") or identity.get("path") or "")).name)
        if chat_template:
            writer.add_string(KEY_CHAT_TEMPLATE, chat_template)
    count = 0
    for module in sorted(pairs):
        ab = pairs[module]
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{module} has lora_{'A' if 'A' not in ab else 'B'} missing")
        gguf_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ExportError(f"no GGUF name for {module} in architecture {arch_name}")
        a, b = ab["A"], ab["B"]
        if permute and module.endswith("q_proj"):
            b = permute_rows(b, n_head)
        elif permute and module.endswith("k_proj"):
            b = permute_rows(b, n_kv)
        writer.add_tensor(gguf_name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(gguf_name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))
        count += 2
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": str(out_path), "arch": arch_name, "tensors": count, "alpha": cfg.get("lora_alpha"),
            "rank": cfg.get("r"), "base_sha256": (identity or {}).get("sha256")}


def export_for_base(adapter_dir: Path, out_path: Path, base_model: str) -> dict[str, Any]:
    """Export with the base's identity: `base_model` is resolved as the trainer resolves it, and must be the
    base the adapter records (its `academy_base.json`)."""
    from academyd.basemodel import BaseModelError, chat_template_of, gguf_metadata
    from academyd.trainer.base import IDENTITY_FILE, materialize

    try:
        model_dir, identity = materialize(base_model)
    except BaseModelError as exc:
        raise ExportError(str(exc)) from None
    recorded_path = adapter_dir / IDENTITY_FILE
    if recorded_path.is_file():
        recorded = json.loads(recorded_path.read_text())
        if recorded.get("sha256") != identity["sha256"]:
            raise ExportError(f"adapter {adapter_dir} was trained on {recorded.get('name')} "
                              f"(sha256 {str(recorded.get('sha256'))[:16]}...), not on {identity['name']} "
                              f"({identity['path']}, sha256 {identity['sha256'][:16]}...)")
    if identity.get("gguf"):
        meta = gguf_metadata(Path(identity["gguf"]))
        identity = {**identity, "organization": meta.get("general.organization")}
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():  # a hub name: its snapshot directory
        cfg_path = Path(identity["path"]) / "config.json"
    return export(adapter_dir, out_path, json.loads(cfg_path.read_text()), identity, chat_template_of(adapter_dir))


def main(argv: list[str] | None = None) -> int:
    from academyd.trainer import _process

    out = _process.prepare()
    p = argparse.ArgumentParser(prog="python -m academyd.arena.export_gguf", description=__doc__.split("\n")[0])
    p.add_argument("adapter_dir", type=Path)
    p.add_argument("out", type=Path)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--base", help="the base model (GGUF file, directory, hub name): records its identity")
    which.add_argument("--base-config", type=Path, help="the base model's config.json (no identity recorded)")
    a = p.parse_args(argv)
    try:
        if not (a.adapter_dir / "adapter_config.json").is_file():
            raise ExportError(f"{a.adapter_dir} has no adapter_config.json")
        if a.base:
            info = export_for_base(a.adapter_dir, a.out, a.base)
        else:
            if not a.base_config.is_file():
                raise ExportError(f"base model config {a.base_config} does not exist")
            info = export(a.adapter_dir, a.out, json.loads(a.base_config.read_text()))
    except ExportError as exc:
        out.write(json.dumps({"error": "bad_input", "reason": str(exc)}) + "\n")
        return S.EXIT_BAD_INPUT
    out.write(json.dumps(info) + "\n")
    return S.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
