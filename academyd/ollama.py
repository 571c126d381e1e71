"""The Ollama client: create `venom-adapter-<vN>` from a version's artifacts through Ollama's HTTP API
(upload the adapter blobs, then `POST /api/create`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from academyd.files import sha256_file
from academyd.settings import Settings

OLLAMA_PREFIX = "venom-adapter-"


class OllamaError(Exception):
    """Ollama's API failed; the message names the endpoint and what it answered."""


async def _ollama_call(session: aiohttp.ClientSession, method: str, url: str, timeout_s: float,
                       **kw: Any) -> tuple[int, Any]:
    try:
        async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout_s), **kw) as resp:
            body = await resp.read()
            try:
                data = json.loads(body) if body else None
            except ValueError:
                data = body.decode(errors="replace")[:500]
            return resp.status, data
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise OllamaError(f"Ollama at {url} unreachable: {type(exc).__name__}: {exc}") from None


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
            digest = "sha256:" + await asyncio.to_thread(_sha256, path)
            status, _ = await _ollama_call(session, "HEAD", f"{base}/api/blobs/{digest}", timeout)
            if status == 404:
                data = await asyncio.to_thread(path.read_bytes)
                status, answer = await _ollama_call(session, "POST", f"{base}/api/blobs/{digest}", timeout, data=data)
                if status not in (200, 201):
                    raise OllamaError(f"Ollama refused the blob {fname} ({digest}): HTTP {status} {answer}")
            elif status != 200:
                raise OllamaError(f"Ollama {base}/api/blobs answered HTTP {status} for {fname}")
            adapters[fname] = digest
        body: dict[str, Any] = {"model": name, "from": artifacts["from"], "adapters": adapters,
                                "parameters": artifacts["parameters"], "stream": False}
        if artifacts.get("template"):
            body["template"] = artifacts["template"]
        status, answer = await _ollama_call(session, "POST", f"{base}/api/create", timeout, json=body)
        if status != 200 or (isinstance(answer, dict) and answer.get("error")):
            err = answer.get("error") if isinstance(answer, dict) else answer
            raise OllamaError(f"Ollama could not create {name} from {artifacts['from']}: HTTP {status}: {err}")
        return {"model": name, "adapters": adapters, "status": (answer or {}).get("status", "success")}
    finally:
        if own:
            await session.close()


def _sha256(path: Path) -> str:
    return sha256_file(path)
