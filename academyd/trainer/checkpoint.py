"""What a run leaves on disk: checkpoints (found by their marker, resumed by spec hash), the loss log,
and the adapter, renamed into place whole. A finished run of the same spec is found again, not redone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from academyd.trainer import spec as S
from academyd.trainer.errors import BadInput, TrainingFailure

CHECKPOINT_MARKER = "academy_checkpoint.json"


def find_checkpoint(ckpt_dir: Path, spec_hash: str) -> tuple[Path | None, int]:
    """The newest complete checkpoint of this spec (one our callback marked after saving), and its step."""
    best: tuple[Path | None, int] = (None, 0)
    if not ckpt_dir.is_dir():
        return best
    for d in ckpt_dir.glob("checkpoint-*"):
        try:
            marker = json.loads((d / CHECKPOINT_MARKER).read_text())
        except (OSError, ValueError):
            continue  # killed while saving: not usable
        if marker.get("spec_hash") != spec_hash:
            raise BadInput(f"{ckpt_dir} holds checkpoints of another spec ({marker.get('spec_hash')}); "
                           "use a new output_dir for a different spec, or delete the old one")
        if marker.get("step", 0) > best[1]:
            best = (d, int(marker["step"]))
    return best


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())


def save_adapter(model: Any, tokenizer: Any, out_dir: Path, base_model: str,
                 identity: dict[str, Any] | None = None) -> Path:
    """Write the adapter into a temp dir and rename it into place: never a half-written adapter/.

    `identity` (the base's, academyd.trainer.base) goes into `academy_base.json` beside the weights."""
    final = out_dir / S.ADAPTER_DIR
    tmp = out_dir / f".adapter.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    cfg_path = tmp / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_model  # what the spec named, not a resolved cache path
    cfg = S.plain_lora_config(cfg)  # rsLoRA's alpha rewritten: served at the scale it was trained at
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if identity is not None:
        from academyd.trainer.base import IDENTITY_FILE

        (tmp / IDENTITY_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        if not (tmp / name).is_file():
            raise TrainingFailure("save_failed", f"saving the adapter wrote no {name}")
    _fsync_tree(tmp)
    old = out_dir / f".adapter.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def trim_loss_log(path: Path, keep_through_step: int) -> None:
    """On resume, drop loss lines the killed attempt logged after its last checkpoint."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= keep_through_step]
    path.write_text("".join(ln + "\n" for ln in kept))


def previous_result(spec: S.TrainSpec) -> dict[str, Any] | None:
    """The summary of a finished run of this very spec in output_dir, if its adapter is there."""
    out = Path(spec.output_dir)
    try:
        summary = json.loads((out / S.SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if summary.get("spec_hash") == S.spec_hash(spec) and (out / S.ADAPTER_DIR / "adapter_config.json").is_file():
        return summary
    return None
