"""The Ollama client: create `venom-adapter-<vN>` from a version's artifacts through Ollama's HTTP API
(upload the blobs, then `POST /api/create`): with the adapter (`adapters`, Ollama before 0.34.1) or from
one merged GGUF (`files`, every version; academyd.arena.merge_gguf makes it)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from academyd.files import sha256_file
from academyd.httpjson import call_json
from academyd.settings import Settings

OLLAMA_PREFIX = "venom-adapter-"


class OllamaError(Exception):
    """Ollama's API failed; the message names the endpoint and what it answered."""


# Ollama 0.34.1 (2026-09) refuses `ollama create` with an ADAPTER ("LoRA adapters are deprecated; the adapter
# layer is carried over but new adapters cannot be created"); tags created before keep serving.
ADAPTERS_REFUSED_FROM = (0, 34, 1)


def version_tuple(version: str) -> tuple[int, ...] | None:
    """"0.34.1" -> (0, 34, 1); "0.34.1-rc2" -> (0, 34, 1); None when it is not a version number."""
    import re

    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    return tuple(int(g or 0) for g in m.groups()) if m else None


def creates_adapters(version: str) -> bool:
    """Whether an Ollama of this version still creates models with an adapter layer (an unknown version
    string: assume a new one, whose merged path works on every version)."""
    v = version_tuple(version)
    return v is not None and v < ADAPTERS_REFUSED_FROM


async def ollama_version(session: aiohttp.ClientSession, base: str, timeout_s: float) -> str:
    """`GET /api/version`: Ollama's version string."""
    status, answer = await call_json(session, "GET", f"{base}/api/version", timeout_s, error=OllamaError)
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("version"), str):
        raise OllamaError(f"Ollama at {base} did not say its version (GET /api/version: HTTP {status} {answer})")
    return str(answer["version"])


async def upload_blob(session: aiohttp.ClientSession, base: str, timeout_s: float, path: Path) -> str:
    """Make `path` a blob in Ollama (`HEAD`, then `POST /api/blobs/<digest>` when it is not there yet);
    return its digest. The file is streamed, never read whole into memory."""
    digest = "sha256:" + await asyncio.to_thread(_sha256, path)
    status, _ = await call_json(session, "HEAD", f"{base}/api/blobs/{digest}", timeout_s, error=OllamaError)
    if status == 404:
        with path.open("rb") as fh:
            status, answer = await call_json(session, "POST", f"{base}/api/blobs/{digest}", timeout_s,
                                             error=OllamaError, data=fh)
        if status not in (200, 201):
            raise OllamaError(f"Ollama refused the blob {path.name} ({digest}): HTTP {status} {answer}")
    elif status != 200:
        raise OllamaError(f"Ollama {base}/api/blobs answered HTTP {status} for {path.name}")
    return digest


async def ollama_create_merged(
    session: aiohttp.ClientSession, base: str, timeout_s: float, *, name: str, gguf_path: Path,
    template: str | None, parameters: dict[str, Any], system: str | None = None,
) -> dict[str, Any]:
    """Create `name` FROM one GGUF model file (a LoRA merged into its base): upload it, `POST /api/create`
    with `files`. No adapter layer: what every Ollama version creates."""
    digest = await upload_blob(session, base, timeout_s, gguf_path)
    body: dict[str, Any] = {"model": name, "files": {gguf_path.name: digest}, "parameters": parameters,
                            "stream": False}
    if template:
        body["template"] = template
    if system:
        body["system"] = system
    status, answer = await call_json(session, "POST", f"{base}/api/create", timeout_s, error=OllamaError,
                                     json=body)
    if status != 200 or (isinstance(answer, dict) and answer.get("error")):
        err = answer.get("error") if isinstance(answer, dict) else answer
        raise OllamaError(f"Ollama could not create {name} from {gguf_path.name}: HTTP {status}: {err}")
    return {"model": name, "files": {gguf_path.name: digest}, "status": (answer or {}).get("status", "success")}


async def ollama_create(
    settings: Settings, row: dict[str, Any], artifacts: dict[str, Any], *,
    http_session: aiohttp.ClientSession | None = None,
) -> dict[str, Any]:
    """Create `venom-adapter-<version>` in Ollama: upload the adapter blobs, then `POST /api/create`."""
    base = (settings.arena.ollama_url or "").rstrip("/")
    timeout = settings.arena.ollama_timeout_s
    name = OLLAMA_PREFIX + row["version"]
    if artifacts.get("gguf_path"):
        files = {"adapter.gguf": Path(artifacts["gguf_path"])}
    else:
        adapter = Path(row["adapter_path"])
        files = {n: adapter / n for n in ("adapter_model.safetensors", "adapter_config.json") if (adapter / n).is_file()}
    own = http_session is None
    session = http_session or aiohttp.ClientSession()
    try:
        adapters: dict[str, str] = {}
        for fname, path in files.items():
            adapters[fname] = await upload_blob(session, base, timeout, path)
        body: dict[str, Any] = {"model": name, "from": artifacts["from"], "adapters": adapters,
                                "parameters": artifacts["parameters"], "stream": False}
        if artifacts.get("template"):
            body["template"] = artifacts["template"]
        status, answer = await call_json(session, "POST", f"{base}/api/create", timeout, error=OllamaError,
                                         json=body)
        if status != 200 or (isinstance(answer, dict) and answer.get("error")):
            err = answer.get("error") if isinstance(answer, dict) else answer
            raise OllamaError(f"Ollama could not create {name} from {artifacts['from']}: HTTP {status}: {err}")
        return {"model": name, "adapters": adapters, "status": (answer or {}).get("status", "success")}
    finally:
        if own:
            await session.close()


def _sha256(path: Path) -> str:
    return sha256_file(path)
