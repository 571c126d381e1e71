"""One JSON-over-HTTP call (aiohttp), for every client of the Academy's: Ollama, the follower's runtimes
(the llama.cpp endpoint, Ollama, Venom) and the arena's judge."""

from __future__ import annotations

import json
from typing import Any

import aiohttp


async def call_json(session: aiohttp.ClientSession, method: str, url: str, timeout_s: float, *,
                    error: type[Exception], **kw: Any) -> tuple[int, Any]:
    """(HTTP status, the answer): the body as JSON, its text (the first 500 characters) when it is not
    JSON, None when it is empty. `kw` goes to aiohttp (json=, data=, headers=). No answer at all (refused,
    reset, timed out): `error`, naming the call."""
    try:
        async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout_s), **kw) as resp:
            status, body = resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise error(f"{method} {url} unreachable: {type(exc).__name__}: {exc}") from None
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, body.decode(errors="replace")[:500]
