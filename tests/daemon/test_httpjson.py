"""academyd.httpjson.call_json, the one JSON-over-HTTP call (Ollama, the follower's runtimes, the judge),
against a real aiohttp server: JSON parsed, text kept short, an empty body None, a dead port the caller's
own error naming the call."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from aiohttp import web

from academyd.httpjson import call_json


class Down(Exception):
    pass


async def test_call_json_answers_and_refusals() -> None:
    async def handle(request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        if kind == "json":
            return web.json_response({"got": await request.json()}, status=201)
        if kind == "text":
            return web.Response(text="x" * 2000, status=502)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{kind}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{port}"
            answer = await call_json(session, "POST", f"{base}/json", 5, error=Down, json={"a": 1})
            assert answer == (201, {"got": {"a": 1}})
            status, text = await call_json(session, "GET", f"{base}/text", 5, error=Down)
            assert (status, text) == (502, "x" * 500)
            assert await call_json(session, "DELETE", f"{base}/empty", 5, error=Down) == (204, None)
            with pytest.raises(Down, match=rf"GET http://127.0.0.1:{dead}/json unreachable: ClientConnector"):
                await call_json(session, "GET", f"http://127.0.0.1:{dead}/json", 5, error=Down)
    finally:
        await runner.cleanup()
