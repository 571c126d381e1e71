"""What the follower checks before a version may touch a runtime: its files and its base.

- The adapter directory hashes to the announced `adapter_sha256` (the registry's manifest hash,
  `academyd.registry.adapter_sha256`), and the GGUF adapter to `gguf_sha256` when the event names one.
- The GGUF adapter's base identity (`general.base_model.*` keys, any `...sha256` among them) agrees with
  the base the runtime serves (the sha256 of its GGUF file and its `general.*` keys). A mismatch names both.

Pure functions over paths and dicts; of a GGUF file only the key/value header is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Refused(Exception):
    """The version must not be deployed; `reason` is one of model.deploy_failed's reasons."""

    reason: str
    detail: str
    code: str | None = None  # the runtime's own reason code, when it refused (Venom's reason_code)

    def __str__(self) -> str:
        return f"{self.reason}{' ' + self.code if self.code else ''}: {self.detail}"


def gguf_keys(path: Path) -> dict[str, Any]:
    """The scalar and string keys of a GGUF file's header (academyd.basemodel.gguf_metadata: arrays skipped,
    tensors never read); Refused("load_failed") when it is not a readable GGUF file."""
    from academyd.basemodel import BaseModelError, gguf_metadata

    try:
        meta = gguf_metadata(path)
    except BaseModelError as exc:
        raise Refused("load_failed", str(exc)) from None
    return {k: v for k, v in meta.items() if not k.startswith("GGUF.")}


def base_identity_of_adapter(keys: dict[str, Any]) -> dict[str, Any]:
    """`general.base_model.*` and every key naming a base sha256, as the adapter declares them."""
    return {k: v for k, v in keys.items() if k.startswith(("general.base_model.", "academy.base_model.")) or
            ("base" in k and k.endswith("sha256"))}


def check_base(adapter_keys: dict[str, Any], base: dict[str, Any], *, require: bool, adapter: str) -> dict[str, Any]:
    """Compare what the adapter says its base is with the runtime's base (`{"sha256", "meta"}`).

    Returns the comparison (for the event); raises Refused("base_mismatch") when they disagree, or when the
    adapter names no base and `require` is set.
    """
    declared = base_identity_of_adapter(adapter_keys)
    base_sha = (base.get("sha256") or "").lower()
    base_name = (base.get("meta") or {}).get("general.name")
    result: dict[str, Any] = {"declared": declared, "runtime_base_sha256": base_sha or None,
                              "runtime_base_name": base_name}
    if not declared:
        if require:
            raise Refused("base_mismatch", f"{adapter} names no base model (no general.base_model.* keys); "
                                           f"the runtime serves {base_name or '?'} (sha256 {base_sha or '?'})")
        result["verified"] = False
        return result
    shas = {k: str(v).lower() for k, v in declared.items() if k.endswith("sha256")}
    names = [str(v) for k, v in declared.items() if k.endswith(".name")]
    for key, value in shas.items():
        if base_sha and value != base_sha:
            raise Refused("base_mismatch", f"{adapter} was trained on {', '.join(names) or 'a base'} with sha256 "
                                           f"{value} ({key}); the runtime serves {base_name or '?'} with sha256 {base_sha}")
    if not shas and base_name and names and base_name not in names:
        raise Refused("base_mismatch", f"{adapter} names its base {', '.join(names)}; the runtime serves "
                                       f"{base_name} (sha256 {base_sha or '?'})")
    result["verified"] = bool(shas and base_sha) or bool(names and base_name)
    return result


def check_files(event: dict[str, Any]) -> dict[str, Any]:
    """The adapter's files are the announced ones. Returns {adapter_sha256, gguf_path, gguf_sha256}."""
    from academyd.files import sha256_file
    from academyd.registry import RegistryError, adapter_sha256

    adapter_path = Path(event["adapter_path"])
    out: dict[str, Any] = {}
    try:
        digest = adapter_sha256(adapter_path)
    except RegistryError as exc:
        raise Refused("missing_artifact", str(exc)) from None
    if digest != event.get("adapter_sha256"):
        raise Refused("sha256_mismatch", f"{adapter_path}: the files hash to {digest}, the event announced "
                                         f"{event.get('adapter_sha256')} (cd {adapter_path} && sha256sum -c "
                                         f"../adapter.sha256sum says which file differs)")
    out["adapter_sha256"] = digest
    gguf_path = event.get("gguf_path") or (str(adapter_path.parent / "adapter.gguf")
                                           if (adapter_path.parent / "adapter.gguf").is_file() else None)
    if gguf_path:
        gp = Path(gguf_path)
        if not gp.is_file():
            raise Refused("missing_artifact", f"the GGUF adapter {gp} does not exist")
        gdigest = sha256_file(gp)
        if event.get("gguf_sha256") and gdigest != str(event["gguf_sha256"]).removeprefix("sha256:"):
            raise Refused("sha256_mismatch", f"{gp}: sha256 {gdigest}, the event announced {event['gguf_sha256']}")
        out.update(gguf_path=str(gp), gguf_sha256=gdigest)
    return out
