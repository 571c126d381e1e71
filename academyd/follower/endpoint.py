"""A llama.cpp runtime served as an OpenAI-compatible HTTP endpoint whose LoRA adapter swaps in place.

    python -m academyd.follower.endpoint --base BASE.gguf [--host 127.0.0.1] [--port 8080] [--threads N]

Runs under an interpreter that has `llama-cpp-python` and `aiohttp` (the trainer environment), never the
daemon's. llama-cpp-python's own server can only rescale the adapters it loaded at start, so this is a
small aiohttp server around one `llama_cpp.Llama` (one model, one context), with llama.cpp's adapter API
(`llama_adapter_lora_init` / `llama_set_adapters_lora` / `llama_adapter_lora_free`) for the swap:

- `POST /v1/chat/completions` (stream or not), `GET /v1/models`: the OpenAI shapes. `model` may be the
  served name (or empty): the active version; `base`: the base model; or a loaded version id (how the
  follower probes a candidate before anybody else is served by it). The reply's `model` says which served.
- `GET /health`: the base's identity (sha256 of the GGUF file, its `general.*` keys), the loaded and the
  active adapters, request counters.
- `POST /admin/adapters` `{id, path, sha256?}`: load a GGUF adapter beside the active one (the file's
  sha256 checked first, its `general.base_model.*` / `*sha256*` keys read back for the caller to judge).
- `POST /admin/activate` `{id}` (null: the base): what the served name means from the next request on.
- `DELETE /admin/adapters/{id}`: free an adapter that is not active.

Admin calls always need `Authorization: Bearer <token>` (`--token-file`, which the follower generates into
the data directory, or `ACADEMY_ENDPOINT_TOKEN`; without either, the admin API is closed: 401) and a JSON
body (`Content-Type: application/json`, else 415): a web page can make a browser send a `text/plain` POST
to localhost without asking anybody, never one with a JSON content type or a header of its own.

Requests are served one at a time on the single context (an asyncio lock; generation runs in a worker
thread). The adapter set on the context is chosen per request, so a swap never interrupts a request: the
one in flight finishes on the adapter it started with, the next one starts on the new adapter. After a
request the KV cache is not reused (`Llama.reset()`): no prompt prefix computed with the old adapter leaks
into an answer of the new one, and an answer depends on its request and the adapter only, not on what was
asked before (llama.cpp's kernels are not batch-invariant, so a reused prefix changes greedy answers near a
tie). The cost is the prompt's evaluation on every request: short for the chat prompts Venom sends.

llama-cpp-python is pinned exactly (academyd/trainer/requirements.txt); `Llama._model.model` and
`Llama._ctx.ctx` (the raw model and context handles the adapter API needs) are private names of that
pinned version.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hmac
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from academyd.files import sha256_file

BASE_ID = "base"


class EndpointError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class Adapter:
    id: str
    path: str
    sha256: str
    handle: Any
    meta: dict[str, str]
    loaded_at: float = field(default_factory=time.time)


class Runtime:
    """One llama.cpp model and context, adapters loaded beside each other, one active."""

    def __init__(self, base: Path, *, threads: int, n_ctx: int, seed: int = 0) -> None:
        import llama_cpp

        self.lc = llama_cpp
        t0 = time.perf_counter()
        self.base_path = base
        self.base_sha256 = sha256_file(base)
        self.llm = llama_cpp.Llama(model_path=str(base), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   seed=seed, verbose=False)
        self.base_meta = {k: v for k, v in self.llm.metadata.items() if k.startswith("general.")}
        self.load_s = time.perf_counter() - t0
        self.adapters: dict[str, Adapter] = {}
        self.active: str | None = None
        self._on_ctx: str | None = None  # the adapter set on the context right now (None: the base)
        self._thread_lock = threading.Lock()  # belt and braces: one thread on the context at a time

    # --------------------------------------------------------- adapters (called from a worker thread)

    def load(self, adapter_id: str, path: Path, sha256: str | None) -> Adapter:
        if adapter_id == BASE_ID or not adapter_id:
            raise EndpointError(400, f"adapter id {adapter_id!r} is reserved")
        if adapter_id in self.adapters:
            have = self.adapters[adapter_id]
            if sha256 and have.sha256 != sha256:
                raise EndpointError(409, f"{adapter_id} is loaded with sha256 {have.sha256}, not {sha256}",
                                    "sha256_mismatch")
            return have
        if not path.is_file():
            raise EndpointError(404, f"adapter file {path} does not exist", "missing_artifact")
        digest = sha256_file(path)
        if sha256 and digest != sha256:
            raise EndpointError(409, f"{path}: sha256 {digest} is not the announced {sha256}", "sha256_mismatch")
        with self._thread_lock:
            handle = self.lc.llama_adapter_lora_init(self.llm._model.model, str(path).encode())
        if not handle:
            raise EndpointError(422, f"llama.cpp could not load {path} as a LoRA adapter of {self.base_path.name} "
                                     "(another architecture or tensor shapes?)", "load_failed")
        adapter = Adapter(adapter_id, str(path), digest, handle, self._adapter_meta(handle))
        self.adapters[adapter_id] = adapter
        return adapter

    def _adapter_meta(self, handle: Any) -> dict[str, str]:
        meta: dict[str, str] = {}
        buf = ctypes.create_string_buffer(4096)
        for i in range(self.lc.llama_adapter_meta_count(handle)):
            n = self.lc.llama_adapter_meta_key_by_index(handle, i, buf, len(buf))
            key = buf.value.decode(errors="replace") if n >= 0 else ""
            n = self.lc.llama_adapter_meta_val_str_by_index(handle, i, buf, len(buf))
            if key and n >= 0:
                meta[key] = buf.value.decode(errors="replace")
        return meta

    def unload(self, adapter_id: str) -> None:
        if adapter_id == self.active:
            raise EndpointError(409, f"{adapter_id} is the active adapter; activate another one first")
        adapter = self.adapters.pop(adapter_id, None)
        if adapter is None:
            raise EndpointError(404, f"no adapter {adapter_id} is loaded", "not_found")
        with self._thread_lock:
            if self._on_ctx == adapter_id:
                self._set_ctx(None)
            self.lc.llama_adapter_lora_free(adapter.handle)

    def _set_ctx(self, adapter_id: str | None) -> None:
        if adapter_id is None:
            rc = self.lc.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        else:
            arr = (self.lc.llama_adapter_lora_p_ctypes * 1)(self.adapters[adapter_id].handle)
            scales = (ctypes.c_float * 1)(1.0)
            rc = self.lc.llama_set_adapters_lora(self.llm._ctx.ctx, arr, 1, scales)
        if rc != 0:
            raise EndpointError(500, f"llama.cpp refused to set adapter {adapter_id} on the context", "server_error")
        self._on_ctx = adapter_id

    def resolve(self, model: str | None, served_name: str) -> str | None:
        if not model or model == served_name:
            return self.active
        if model == BASE_ID:
            return None
        if model in self.adapters:
            return model
        raise EndpointError(404, f"model {model!r} is not served here (try {served_name!r}, 'base' or one of "
                                 f"{sorted(self.adapters)})", "model_not_found")

    def chat(self, adapter_id: str | None, body: dict[str, Any], stream: bool) -> Any:
        with self._thread_lock:
            if adapter_id != self._on_ctx:
                self._set_ctx(adapter_id)
            # Every request is evaluated from position 0: llama-cpp-python would reuse the KV prefix the
            # last request left, evaluate only the rest, in a batch of another shape, and llama.cpp's kernels
            # are not batch-invariant; a greedy answer near a tie then depended on what was asked before
            # (measured: the same question answered two ways in a row on an x86-64-v3 build).
            self.llm.reset()
            kwargs = {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
                                          "presence_penalty", "frequency_penalty", "repeat_penalty") if k in body}
            kwargs.setdefault("max_tokens", 128)
            result = self.llm.create_chat_completion(messages=body["messages"], stream=stream, **kwargs)
            if not stream:
                return result
            return list(result)  # consumed under the lock; the caller streams the chunks out


# --------------------------------------------------------------------------- HTTP


class Server:
    def __init__(self, runtime: Runtime, *, served_name: str, token: str | None) -> None:
        self.rt = runtime
        self.served_name = served_name
        self.token = token
        self.lock = asyncio.Lock()
        self.stats = {"requests": 0, "failed": 0, "in_flight": 0, "swaps": 0}
        self.app = web.Application(client_max_size=8 * 1024 * 1024, middlewares=[self._errors])
        self.app.add_routes([
            web.get("/health", self.health),
            web.get("/v1/models", self.models),
            web.post("/v1/chat/completions", self.chat),
            web.post("/admin/adapters", self.load),
            web.delete("/admin/adapters/{id}", self.unload),
            web.post("/admin/activate", self.activate),
        ])

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except EndpointError as exc:
            return web.json_response({"error": {"message": str(exc), "type": exc.code, "code": exc.code}},
                                     status=exc.status)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return web.json_response({"error": {"message": f"bad request: {exc}", "type": "invalid_request_error"}},
                                     status=400)

    def _admin(self, request: web.Request) -> None:
        if not self.token:
            raise EndpointError(401, "the admin API is closed: this endpoint was started without a token "
                                "(--token-file or ACADEMY_ENDPOINT_TOKEN)", "unauthorized")
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise EndpointError(401, "admin calls need 'Authorization: Bearer <token>' (the follower's token: "
                                "<data_dir>/follower/endpoint.token)", "unauthorized")
        if request.method == "POST" and request.content_type != "application/json":
            raise EndpointError(415, f"admin calls take a JSON body (Content-Type: application/json), not "
                                f"{request.content_type or 'none'}", "unsupported_media_type")

    def _adapter_info(self, a: Adapter) -> dict[str, Any]:
        return {"id": a.id, "path": a.path, "sha256": a.sha256, "meta": a.meta, "loaded_at": a.loaded_at}

    async def health(self, request: web.Request) -> web.Response:
        rt = self.rt
        return web.json_response({
            "ok": True, "served_name": self.served_name, "active": rt.active, "pid": os.getpid(),
            "base": {"path": str(rt.base_path), "sha256": rt.base_sha256, "meta": rt.base_meta, "load_s": rt.load_s},
            "adapters": [self._adapter_info(a) for a in rt.adapters.values()], "stats": self.stats,
        })

    async def models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        ids = [self.served_name, BASE_ID, *self.rt.adapters]
        return web.json_response({"object": "list", "data": [
            {"id": i, "object": "model", "created": created, "owned_by": "academyd",
             **({"active": self.rt.active or BASE_ID} if i == self.served_name else {})} for i in ids]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            raise EndpointError(400, "the body needs 'messages': a non-empty list of {role, content}")
        stream = bool(body.get("stream"))
        self.stats["requests"] += 1
        self.stats["in_flight"] += 1
        try:
            async with self.lock:
                adapter_id = self.rt.resolve(body.get("model"), self.served_name)
                result = await asyncio.to_thread(self.rt.chat, adapter_id, body, stream)
        except EndpointError:
            self.stats["failed"] += 1
            raise
        except Exception as exc:
            self.stats["failed"] += 1
            raise EndpointError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error") from exc
        finally:
            self.stats["in_flight"] -= 1
        served = adapter_id or BASE_ID
        headers = {"X-Academy-Adapter": served}
        if not stream:
            result["model"] = served
            return web.json_response(result, headers=headers)
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for chunk in result:
            chunk["model"] = served
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def load(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = await request.json()
        t0 = time.perf_counter()
        async with self.lock:
            adapter = await asyncio.to_thread(self.rt.load, str(body["id"]), Path(body["path"]), body.get("sha256"))
        return web.json_response({**self._adapter_info(adapter), "load_s": time.perf_counter() - t0,
                                  "base": {"sha256": self.rt.base_sha256, "meta": self.rt.base_meta}})

    async def unload(self, request: web.Request) -> web.Response:
        self._admin(request)
        async with self.lock:
            await asyncio.to_thread(self.rt.unload, request.match_info["id"])
        return web.json_response({"ok": True, "adapters": sorted(self.rt.adapters)})

    async def activate(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = await request.json()
        target = body.get("id") or None
        if target is not None and target not in self.rt.adapters:
            raise EndpointError(404, f"no adapter {target} is loaded; POST /admin/adapters first", "not_found")
        async with self.lock:  # between two requests, never during one
            previous, self.rt.active = self.rt.active, target
        self.stats["swaps"] += 1
        return web.json_response({"ok": True, "active": target, "previous": previous, "request": str(uuid.uuid4())})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m academyd.follower.endpoint", description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, required=True, help="the base model's GGUF file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed on stdout)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--served-name", default="academy", help="the model name clients ask for")
    p.add_argument("--token-file", type=Path, help="the admin token (default: ACADEMY_ENDPOINT_TOKEN; neither: "
                   "the admin API is closed)")
    p.add_argument("--adapter", action="append", default=[], metavar="ID=PATH",
                   help="load and activate an adapter at start (the last one given is active)")
    a = p.parse_args(argv)
    if not a.base.is_file():
        print(json.dumps({"error": "missing_base", "reason": f"base model {a.base} does not exist"}), flush=True)
        return 2
    token = os.environ.get("ACADEMY_ENDPOINT_TOKEN") or None
    if a.token_file is not None:
        try:
            token = a.token_file.read_text().strip() or None
        except OSError as exc:
            print(json.dumps({"error": "bad_token_file", "reason": f"cannot read {a.token_file}: {exc}"}), flush=True)
            return 2
    rt = Runtime(a.base, threads=a.threads, n_ctx=a.ctx)
    for spec in a.adapter:
        aid, _, path = spec.partition("=")
        rt.load(aid, Path(path), None)
        rt.active = aid
    server = Server(rt, served_name=a.served_name, token=token)

    async def serve() -> None:
        runner = web.AppRunner(server.app, access_log=None)
        await runner.setup()
        import socket

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((a.host, a.port))
        port = sock.getsockname()[1]
        await web.SockSite(runner, sock).start()
        print(json.dumps({"ready": True, "url": f"http://{a.host}:{port}", "pid": os.getpid(),
                          "base_sha256": rt.base_sha256, "load_s": round(rt.load_s, 3)}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
