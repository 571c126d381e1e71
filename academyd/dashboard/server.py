"""The Academy page, its JSON API, the live feed (SSE) and /metrics, served by the daemon (aiohttp).

Auth rules:
- Reads (the page, GET /api/*, SSE, /metrics) are open; the server binds loopback by default, and when it
  does, a request must name a loopback host (a DNS-rebinding page cannot read it through its own name).
- State changes (POST /api/train, /api/models/{version}/promote, /api/rollback) need the configured
  token (`http.token`, ACADEMY_HTTP__TOKEN) as `Authorization: Bearer <token>`. Without a configured
  token they are refused (403) and the page is read-only, saying how to enable them. A POST whose Origin
  is another site is refused whatever it carries.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from academyd.dashboard import data
from academyd.dashboard.live import LiveFeed
from academyd.dashboard.metrics import AcademyCollector, make_registry, render
from academyd.health import Health
from academyd.seams import Counters, LiveEvents, ModelActions, RunRequests, StatusSource
from academyd.secrets import scanner
from academyd.settings import Settings
from academyd.store import Store
from schemas.models import is_version

log = structlog.get_logger("academyd.dashboard")

STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0
ENABLE_HINT = (
    "state changes from the page are disabled because no token is configured; set ACADEMY_HTTP__TOKEN "
    "(or `token` under [http] in the TOML file) and restart the daemon, then type the token on the page"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class PageUnavailable(OSError):
    """The page cannot be served (its port is taken, the address does not exist); the message says what to do."""


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda v: json.dumps(v, default=str, ensure_ascii=False))


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"ok": False, "error": message, **extra}, status=status)


class WebServer:
    """Serves the page on `settings.http.host:port` (port 0: a free port; `url` says which).

    Depends on its seams (academyd.seams), not on the daemon: the store it reads, the health and
    readiness it reports, the status document, the trigger (POST /api/train), the pipeline's model
    actions (promote, rollback; None: not in this daemon), the live events and the consumer lag."""

    def __init__(self, settings: Settings, *, store: Store, health: Health, ready: asyncio.Event,
                 status: StatusSource, runs: RunRequests, actions: ModelActions | None, pipeline: StatusSource | None,
                 live: LiveEvents, counters: Counters, consumer_lag: Callable[[], Awaitable[int | None]]) -> None:
        self.daemon_settings = settings
        self.settings = settings.http
        self.store = store
        self.health = health
        self.ready = ready
        self.status_source = status
        self.runs = runs
        self.actions = actions
        self.live = live
        self.consumer_lag = consumer_lag
        self.feed = LiveFeed()
        self.collector = AcademyCollector(store, settings, counters, health, self.feed, pipeline)
        self.registry = make_registry(self.collector)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def url(self) -> str:
        host = self.settings.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        return f"http://{shown}:{self._port or self.settings.port}"

    async def start(self) -> None:
        self.live.add_listener(self.feed.on_event)
        webapp = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        r = webapp.router
        r.add_get("/", self._index)
        r.add_static("/static/", STATIC, append_version=False)
        r.add_get("/healthz", self._healthz)
        r.add_get("/metrics", self._metrics)
        r.add_get("/api/status", self._status)
        r.add_get("/api/runs", self._runs)
        r.add_get("/api/runs/{run_id}/loss", self._loss)
        r.add_get("/api/datasets", self._datasets)
        r.add_get("/api/models", self._models)
        r.add_get("/api/dlq", self._dlq)
        r.add_get("/api/watch", self._watch)
        r.add_get("/api/events", self._events)
        r.add_post("/api/train", self._train)
        r.add_post("/api/models/{version}/promote", self._promote)
        r.add_post("/api/rollback", self._rollback)
        self._runner = web.AppRunner(webapp, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            self.live.remove_listener(self.feed.on_event)
            raise PageUnavailable(
                exc.errno, f"cannot serve the Academy page on {self.settings.host}:{self.settings.port}: "
                f"{exc.strerror}. Pick another port (ACADEMY_HTTP__PORT, 0 = any free port) or disable the page "
                "(ACADEMY_HTTP__ENABLED=false)"
            ) from exc
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self._port = sockets[0].getsockname()[1] if sockets else self.settings.port
        if not _is_loopback(self.settings.host) and not self.settings.token:
            log.warning("page_exposed_read_only", host=self.settings.host,
                        hint="reads are open to the network; set http.token to allow state changes")
        log.info("page_ready", url=self.url, state_changes="token" if self.settings.token else "disabled")

    def status(self) -> dict[str, Any]:
        """This server's part of `academy.status`."""
        return {"page_url": self.url}

    async def stop(self) -> None:
        self.live.remove_listener(self.feed.on_event)
        self.feed.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ guards

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if _is_loopback(self.settings.host):
            host = (urlsplit(f"//{request.host}").hostname or "") if request.host else ""
            if not _is_loopback(host):
                return _error(421, f"this page answers to loopback names only, not {request.host!r}; "
                              "open it as http://127.0.0.1:<port>/ or set http.host to serve other names")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("Origin")
            if origin and origin != "null" and urlsplit(origin).netloc != request.host:
                return _error(403, f"cross-site request from {origin} refused")
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(SECURITY_HEADERS)
            raise
        if not response.prepared:
            response.headers.update(SECURITY_HEADERS)
        return response

    def _authorized(self, request: web.Request) -> web.Response | None:
        """None when the request may change state; otherwise the refusal to send."""
        token = self.settings.token
        if not token:
            return _error(403, ENABLE_HINT, auth="disabled")
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            resp = _error(401, "this action needs the Academy token (http.token): send "
                          "`Authorization: Bearer <token>`, or type it on the page", auth="token")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="academyd"'
            return resp
        return None

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text=json.dumps({"ok": False, "error": "the body must be JSON"}),
                                     content_type="application/json") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text=json.dumps({"ok": False, "error": "the body must be a JSON object"}),
                                     content_type="application/json")
        return body

    # ------------------------------------------------------------ reads

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def _healthz(self, request: web.Request) -> web.Response:
        health = self.health
        if not health.ok:  # e.g. the store cannot take writes: ingest waits (nothing is lost)
            return _json({"ok": False, "ready": self.ready.is_set(), "reason": health.summary(),
                          **health.as_dict()}, status=503)
        return _json({"ok": True, "ready": self.ready.is_set(), "state": "healthy"})

    async def _metrics(self, request: web.Request) -> web.Response:
        self.collector.consumer_lag = await self.consumer_lag()
        body = render(self.registry)
        text, types, ok = scanner().clean(body.decode())
        if types:  # a label value that holds a secret: the scrape gets the redacted text (or nothing)
            body = (text if ok else "# withheld: a metric holds a secret that could not be redacted\n").encode()
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def _store(self) -> Store:
        if self._runner is None:
            raise web.HTTPServiceUnavailable(text='{"ok": false, "error": "the daemon is stopping"}',
                                             content_type="application/json")
        return self.store

    async def _status(self, request: web.Request) -> web.Response:
        self._store()
        s = self.status_source.status()
        run = s.get("active_run")
        s["live"] = self.feed.latest(run["run_id"]) if run else None
        s["page"] = {
            "state_changes": "token" if self.settings.token else "disabled",
            "hint": None if self.settings.token else ENABLE_HINT,
            "pipeline": self.actions is not None,
        }
        return _json(s)

    async def _runs(self, request: web.Request) -> web.Response:
        limit = _limit(request, 20, 200)
        return _json({"runs": data.runs(self._store(), self.daemon_settings, self.feed, limit)})

    async def _loss(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        # The store and the live ring on the loop (both are the loop's), the loss file off it.
        run, live = self._store().get_run(run_id), self.feed.points(run_id)
        if run is None and not live:
            return _error(404, f"no run {run_id!r}; GET /api/runs lists them")
        return _json(await asyncio.to_thread(data.loss_curve, self.daemon_settings, run_id, run, live))

    async def _datasets(self, request: web.Request) -> web.Response:
        out = data.datasets(self._store(), _limit(request, 5, 50))
        for d in out["datasets"]:  # files are read off the event loop
            d["length_histogram"]["train"] = await asyncio.to_thread(data.histogram, d.get("path"))
            d["length_histogram"]["heldout"] = await asyncio.to_thread(data.histogram, d.get("heldout_path"))
        return _json(out)

    async def _models(self, request: web.Request) -> web.Response:
        return _json(data.models(self._store(), self.daemon_settings))

    async def _watch(self, request: web.Request) -> web.Response:
        """Per promotion: the champion's running rate and confidence sequence against its parent (#20)."""
        from academyd.dashboard import watch

        self._store()
        limit = _limit(request, 10, 100)
        return _json({"promotions": await asyncio.to_thread(watch.read, self.daemon_settings.db_path,
                                                             self.daemon_settings, limit)})

    async def _dlq(self, request: web.Request) -> web.Response:
        store = self._store()
        return _json({"count": store.dlq_count(), "by_reason": store.dlq_by_reason(),
                      "recent": data.dlq(store, _limit(request, 50, 500))})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
            **SECURITY_HEADERS,
        })
        await resp.prepare(request)
        q = self.feed.subscribe()
        try:
            await resp.write(b"retry: 2000\n: connected\n\n")
            while True:
                try:
                    item = await asyncio.wait_for(q.get(), KEEPALIVE_S)
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
                if item is None:
                    break
                subject, payload = item
                line = json.dumps({"subject": subject, "data": payload}, default=str, ensure_ascii=False)
                await resp.write(f"data: {line}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.feed.unsubscribe(q)
        return resp

    # ------------------------------------------------------------ state changes

    async def _train(self, request: web.Request) -> web.Response:
        if (refusal := self._authorized(request)) is not None:
            return refusal
        body = await self._body(request)
        force = body.get("force", False)
        if not isinstance(force, bool):
            return _error(400, "force must be true or false")
        reason = str(body.get("reason") or "from the page")[:500]
        self._store()
        result = self.runs.evaluate("page", force=force, reason=f"page: {reason}" + (" (forced)" if force else ""))
        log.info("page_train", started=result.get("started"), force=force, reason=result.get("reason"))
        return _json(result, status=200 if result.get("started") else 409)

    async def _promote(self, request: web.Request) -> web.Response:
        if (refusal := self._authorized(request)) is not None:
            return refusal
        version = request.match_info["version"]
        if not is_version(version):
            return _error(400, f"{version!r} is not a version; versions look like v3")
        body = await self._body(request)
        return await self._pipeline_call("promote", version=version, reason=str(body.get("reason") or "page"))

    async def _rollback(self, request: web.Request) -> web.Response:
        if (refusal := self._authorized(request)) is not None:
            return refusal
        body = await self._body(request)
        return await self._pipeline_call("rollback", reason=str(body.get("reason") or "page"))

    async def _pipeline_call(self, action: str, **kw: Any) -> web.Response:
        pipeline = self.actions
        if pipeline is None:
            return _error(503, f"{action} needs the training pipeline, which this build of academyd does not "
                          "include yet")
        try:
            result = await getattr(pipeline, action)(**kw)
        except ModuleNotFoundError as exc:
            return _error(503, f"{action} is not available in this build of academyd ({exc.name} is missing)")
        except (ValueError, KeyError, LookupError) as exc:
            return _error(400, str(exc))
        log.info(f"page_{action}", **{k: v for k, v in kw.items()}, ok=result.get("ok"))
        return _json(result, status=200 if result.get("ok", True) else 409)


def _limit(request: web.Request, default: int, most: int) -> int:
    try:
        return max(1, min(most, int(request.query.get("limit", default))))
    except ValueError:
        return default
