"""Base identity: the GGUF adapter records the base it was trained on, and consumers refuse another base.

Runs on the tiny model (a directory base: its identity is the sha256 of its files' manifest); the real
GGUF base is in tests/model.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from academyd.basemodel import BaseMismatch, adapter_base_identity, check_adapter_base, resolve_base
from fixtures.trainer import trainer_env


def export(trainer_python: Path, adapter: Path, out: Path, base: Path) -> dict:
    proc = subprocess.run([str(trainer_python), "-m", "academyd.arena.export_gguf", str(adapter), str(out),
                           "--base", str(base)], env=trainer_env(), capture_output=True, text=True, timeout=600)
    return {"rc": proc.returncode, **json.loads(proc.stdout.splitlines()[-1])}


def test_the_gguf_adapter_names_its_base_and_another_base_is_refused(
    trainer_python: Path, tiny_base_model: Path, trained_good: Path, tmp_path: Path
) -> None:
    base = resolve_base(str(tiny_base_model))
    recorded = json.loads((trained_good / "adapter" / "academy_base.json").read_text())
    assert recorded["sha256"] == base.sha256  # the trainer wrote it beside the weights
    info = export(trainer_python, trained_good / "adapter", tmp_path / "a.gguf", tiny_base_model)
    assert info["rc"] == 0 and info["base_sha256"] == base.sha256
    ident = adapter_base_identity(tmp_path / "a.gguf")
    assert ident["sha256"] == base.sha256 and ident["name"] == base.name and ident["chat_template"]
    assert check_adapter_base(tmp_path / "a.gguf", base)["sha256"] == base.sha256

    other = "0" * 64
    with pytest.raises(BaseMismatch) as exc:
        check_adapter_base(tmp_path / "a.gguf", other)
    assert base.sha256[:16] in str(exc.value) and other[:16] in str(exc.value) and base.name in str(exc.value)

    # Exporting against a different base than the one it was trained on is refused, naming both.
    changed = tmp_path / "other-base"
    subprocess.run(["cp", "-r", str(tiny_base_model), str(changed)], check=True)
    cfg = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    refused = export(trainer_python, trained_good / "adapter", tmp_path / "b.gguf", changed)
    assert refused["rc"] == 2 and "not on other-base" in refused["reason"] and "was trained on model" in refused["reason"]
    assert not (tmp_path / "b.gguf").exists()
