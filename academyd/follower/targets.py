"""Runtime targets of the follower: where a version is loaded, probed and switched to.

Every target does the same five things, so the follower's rules live in one place
(academyd.follower.follower):

- `base()`: the identity of the base model the runtime serves (`{"sha256", "meta"}`, may be partial);
- `serving()`: the version serving now (None: the base);
- `stage(version, files)`: make the version available beside the one serving, not yet switched to;
- `ask(version, messages, max_tokens)`: one greedy chat answer from that version (the probe);
- `switch(version)`: from now on the version serves; `discard(version)`: free a staged or old one.

`probe_first` says whether a version can be asked before it is switched to (llama.cpp, Ollama) or only
after (Venom's activate API), in which case a failed probe switches back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from academyd.childenv import child_env
from academyd.follower.verify import Refused
from academyd.httpjson import call_json
from academyd.settings import Settings
from schemas.models import VERSION_PATTERN

log = structlog.get_logger("academyd.follower")

REPO_ROOT = Path(__file__).resolve().parents[2]


class TargetError(Exception):
    """The runtime did not do what was asked (unreachable, refused); the message says what it answered."""


def _error_text(answer: Any) -> str:
    if isinstance(answer, dict):
        err = answer.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err)
        if err:
            return str(err)
        return str(answer.get("detail") or answer)[:500]
    return str(answer)[:500]


class Target(ABC):
    name = "target"
    probe_first = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.follower
        self.session: aiohttp.ClientSession | None = None
        self._base: dict[str, Any] | None = None

    @property
    @abstractmethod
    def runtime(self) -> str: ...

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def base(self) -> dict[str, Any]:
        """The base's identity from `follower.base_gguf` (the file the runtime's base was made from), if set."""
        if self._base is None:
            path = await asyncio.to_thread(base_gguf_of, self.settings)
            self._base = {} if path is None else await asyncio.to_thread(_file_identity, path)
        return self._base

    @abstractmethod
    async def serving(self) -> str | None: ...

    async def stage(self, version: str, files: dict[str, Any]) -> dict[str, Any]:
        return {}

    @abstractmethod
    async def ask(self, version: str | None, messages: list[dict[str, Any]], max_tokens: int) -> str: ...

    @abstractmethod
    async def switch(self, version: str | None, files: dict[str, Any] | None) -> None: ...

    async def discard(self, version: str) -> None:
        return None

    def assume(self, version: str | None) -> None:
        """What the follower's own record says serves (for runtimes that cannot be asked)."""

    async def _req(self, method: str, url: str, **kw: Any) -> tuple[int, Any]:
        assert self.session is not None, "start() first"
        return await call_json(self.session, method, url, self.cfg.timeout_s, error=TargetError, **kw)


def base_gguf_of(settings: Settings) -> Path | None:
    """`follower.base_gguf`, or else the Academy's own base when it is a GGUF (the default SmolLM2 is): the
    follower beside a default install serves what the adapters were trained on, with nothing to configure."""
    if settings.follower.base_gguf is not None:
        return settings.follower.base_gguf
    from academyd.basemodel import BaseModelError, resolve_base

    try:
        base = resolve_base(settings.training.base_model, trainer_python=settings.training.trainer_python)
    except BaseModelError:
        return None
    return Path(base.gguf) if base.gguf else None


def _file_identity(path: Path) -> dict[str, Any]:
    from academyd.files import sha256_file
    from academyd.follower.verify import gguf_keys

    if not path.is_file():
        raise TargetError(f"follower.base_gguf {path} does not exist")
    return {"sha256": sha256_file(path), "meta": {k: v for k, v in gguf_keys(path).items() if k.startswith("general.")}}


# ------------------------------------------------------------------ llama.cpp (the follower's own endpoint)


class LlamaCppTarget(Target):
    """The endpoint of academyd.follower.endpoint: joined at `endpoint_url`, or started here on `base_gguf`."""

    name = "llamacpp"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.url = (self.cfg.endpoint_url or "").rstrip("/")
        self.proc: subprocess.Popen[bytes] | None = None
        from academyd.follower.admin_token import TOKEN_FILE, ensure_token

        # The admin token: ACADEMY_ENDPOINT_TOKEN for an endpoint joined at endpoint_url, else the one
        # generated into the data directory (the endpoint started here reads the same file).
        self.token_file = settings.follower_dir / TOKEN_FILE
        token = (os.environ.get("ACADEMY_ENDPOINT_TOKEN") if self.url else None) or ensure_token(self.token_file)
        self.headers = {"Authorization": f"Bearer {token}"}

    @property
    def runtime(self) -> str:
        return self.url

    async def start(self) -> None:
        await super().start()
        if not self.url:
            self.url = await asyncio.to_thread(self._spawn)
        status, health = await self._req("GET", f"{self.url}/health")
        if status != 200:
            raise TargetError(f"the llama.cpp endpoint at {self.url} answered HTTP {status}: {_error_text(health)}")

    def _spawn(self) -> str:
        cfg = self.cfg
        base_gguf = base_gguf_of(self.settings)
        if base_gguf is None or not base_gguf.is_file():
            raise TargetError(f"follower.base_gguf {base_gguf} is not a GGUF file (and training.base_model is not "
                              "one): set it to the base model the endpoint serves, or follower.endpoint_url to join "
                              "a running endpoint")
        python = cfg.runtime_python or self.settings.training.trainer_python or (REPO_ROOT / ".venv-trainer/bin/python")
        if not Path(python).exists():
            raise TargetError(f"no interpreter {python} for the llama.cpp endpoint: set follower.runtime_python to "
                              "one with llama-cpp-python (make trainer-env installs it in .venv-trainer)")
        threads = cfg.threads or max(1, (os.cpu_count() or 2) // 2)
        # The token goes by file, never through a child's environment (nor does anything else secret).
        env = child_env(pythonpath=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
        log_path = self.settings.follower_dir / "endpoint.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(python), "-m", "academyd.follower.endpoint", "--base", str(base_gguf), "--host", cfg.host,
             "--port", str(cfg.port), "--threads", str(threads), "--served-name", cfg.served_name,
             "--token-file", str(self.token_file)],
            stdout=subprocess.PIPE, stderr=open(log_path, "ab"), env=env,  # noqa: SIM115
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        try:
            ready = json.loads(line)
        except ValueError:
            ready = {}
        if not ready.get("ready"):
            self.proc.wait(10)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise TargetError(f"the llama.cpp endpoint did not start ({line.strip() or 'no output'}); {log_path}: {tail}")
        log.info("endpoint_started", url=ready["url"], pid=ready["pid"], load_s=ready.get("load_s"))
        return str(ready["url"])

    async def close(self) -> None:
        await super().close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    async def base(self) -> dict[str, Any]:
        status, health = await self._req("GET", f"{self.url}/health")
        if status != 200:
            raise TargetError(f"{self.url}/health answered HTTP {status}")
        return dict(health["base"])

    async def serving(self) -> str | None:
        status, health = await self._req("GET", f"{self.url}/health")
        if status != 200:
            raise TargetError(f"{self.url}/health answered HTTP {status}")
        return health.get("active")

    async def stage(self, version: str, files: dict[str, Any]) -> dict[str, Any]:
        if not files.get("gguf_path"):
            raise Refused("missing_artifact", f"{version} has no GGUF adapter (adapter.gguf); llama.cpp loads only GGUF")
        status, answer = await self._req("POST", f"{self.url}/admin/adapters", headers=self.headers, json={
            "id": version, "path": files["gguf_path"], "sha256": files.get("gguf_sha256")})
        if status == 409 and isinstance(answer, dict) and (answer.get("error") or {}).get("code") == "sha256_mismatch":
            raise Refused("sha256_mismatch", _error_text(answer))
        if status in (404, 422):
            raise Refused("load_failed", _error_text(answer))
        if status != 200:
            raise TargetError(f"the endpoint could not load {version}: HTTP {status}: {_error_text(answer)}")
        return {"load_s": answer.get("load_s"), "adapter_meta": answer.get("meta")}

    async def ask(self, version: str | None, messages: list[dict[str, Any]], max_tokens: int) -> str:
        status, answer = await self._req("POST", f"{self.url}/v1/chat/completions", json={
            "model": version or "base", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0})
        if status != 200:
            raise TargetError(f"chat with {version or 'base'}: HTTP {status}: {_error_text(answer)}")
        return str(answer["choices"][0]["message"].get("content") or "")

    async def switch(self, version: str | None, files: dict[str, Any] | None) -> None:
        status, answer = await self._req("POST", f"{self.url}/admin/activate", headers=self.headers,
                                         json={"id": version})
        if status != 200:
            raise TargetError(f"the endpoint could not activate {version or 'base'}: HTTP {status}: {_error_text(answer)}")

    async def discard(self, version: str) -> None:
        status, answer = await self._req("DELETE", f"{self.url}/admin/adapters/{version}", headers=self.headers)
        if status not in (200, 404):
            log.warning("adapter_unload_failed", version=version, status=status, error=_error_text(answer))


# ------------------------------------------------------------------ Ollama


_TEMPLATE = re.compile(r'^TEMPLATE\s+"""(.*?)"""', re.S | re.M)
_PARAM = re.compile(r"^PARAMETER\s+(\S+)\s+(.+?)\s*$", re.M)


def modelfile_parts(text: str) -> tuple[str | None, dict[str, Any]]:
    """TEMPLATE and PARAMETER lines of a Modelfile the registry wrote (for Ollama's JSON create API)."""
    m = _TEMPLATE.search(text)
    params: dict[str, Any] = {}
    for key, raw in _PARAM.findall(text):
        value: Any = raw.strip().strip('"') if raw.strip().startswith('"') else raw.strip()
        if not raw.strip().startswith('"'):
            try:
                value = json.loads(raw)
            except ValueError:
                pass
        if key == "stop":
            params.setdefault("stop", []).append(value)
        else:
            params[key] = value
    return (m.group(1) if m else None), params


class OllamaTarget(Target):
    """Ollama's HTTP API. At start, `GET /api/version` decides how a version becomes a model (`ollama_serve`
    auto): before 0.34.1 `venom-adapter-<version>` is created FROM the base with the adapter's blob; from
    0.34.1 on, which refuses new adapter models, the LoRA is merged into the base GGUF (Q8_0 or F16, in the
    trainer's interpreter: academyd.arena.merge_gguf) and the tag is created FROM that one file. Either tag
    is immutable (made once per version, reused while it exists); the alias Venom asks for is pointed at it
    (`POST /api/copy`) only after the probe; back to the base: the alias is copied from the base's tag.
    What serves is read back from `/api/tags` (the alias shares its manifest digest with its source)."""

    name = "ollama"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        if not self.cfg.ollama_url:
            raise TargetError("follower.target = ollama needs follower.ollama_url (e.g. http://127.0.0.1:11434)")
        self.url = self.cfg.ollama_url.rstrip("/")
        self.base_name = self.cfg.ollama_base or settings.arena.ollama_base or settings.training.base_model
        self._serving: str | None = None
        self.version: str | None = None
        self.merged = self.cfg.ollama_serve == "merged"

    @property
    def runtime(self) -> str:
        how = "merged models" if self.merged else "adapter models"
        return f"{self.url} (Ollama {self.version or '?'}, {how}, alias {self.cfg.ollama_alias})"

    async def start(self) -> None:
        from academyd.ollama import OllamaError, creates_adapters, ollama_version

        await super().start()
        assert self.session is not None
        try:
            self.version = await ollama_version(self.session, self.url, self.cfg.timeout_s)
        except OllamaError as exc:
            raise TargetError(str(exc)) from None
        if self.cfg.ollama_serve == "auto":
            self.merged = not creates_adapters(self.version)
        elif self.cfg.ollama_serve == "adapter" and not creates_adapters(self.version):
            raise TargetError(f"follower.ollama_serve = adapter, but Ollama {self.version} creates no adapter models "
                              "(refused from 0.34.1 on): set it to auto or merged")
        log.info("ollama_target", url=self.url, ollama_version=self.version,
                 serve="merged" if self.merged else "adapter")
        self._serving = await self._alias_source()

    async def _alias_source(self) -> str | None:
        """The version whose tag the alias is a copy of (same manifest digest in `/api/tags`); None: the base
        or no alias yet."""
        from academyd.ollama import OLLAMA_PREFIX

        status, answer = await self._req("GET", f"{self.url}/api/tags")
        if status != 200 or not isinstance(answer, dict):
            raise TargetError(f"Ollama's /api/tags answered HTTP {status}: {_error_text(answer)}")
        models = {_untagged(str(m.get("name") or m.get("model"))): m.get("digest") for m in answer.get("models") or []}
        alias = models.get(_untagged(self.cfg.ollama_alias))
        if alias is None:
            return None
        for name, digest in models.items():
            if digest == alias and name.startswith(OLLAMA_PREFIX) and re.fullmatch(VERSION_PATTERN,
                                                                                    name[len(OLLAMA_PREFIX):]):
                return name[len(OLLAMA_PREFIX):]
        return None

    async def serving(self) -> str | None:
        return self._serving

    def assume(self, version: str | None) -> None:
        if self._serving is None:
            self._serving = version

    def tag(self, version: str | None) -> str:
        from academyd.ollama import OLLAMA_PREFIX

        return OLLAMA_PREFIX + version if version else self.base_name

    async def stage(self, version: str, files: dict[str, Any]) -> dict[str, Any]:
        tag = self.tag(version)
        status, _ = await self._req("POST", f"{self.url}/api/show", json={"model": tag})
        if status == 200:  # immutable: made once per version (an adapter tag made before 0.34.1 still serves)
            return {"created": False, "tag": tag}
        template, params = None, {}
        if files.get("modelfile_path") and Path(files["modelfile_path"]).is_file():
            template, params = modelfile_parts(Path(files["modelfile_path"]).read_text())
        if self.merged:
            return await self._create_merged(version, tag, files, template, params)
        return await self._create_adapter(version, tag, files, template, params)

    async def _create_adapter(self, version: str, tag: str, files: dict[str, Any], template: str | None,
                              params: dict[str, Any]) -> dict[str, Any]:
        from academyd.ollama import OllamaError, ollama_create

        artifacts = {"gguf_path": files.get("gguf_path"), "from": self.base_name, "parameters": params,
                     "template": template}
        row = {"version": version, "adapter_path": files["adapter_path"]}
        settings = self.settings.model_copy(update={"arena": self.settings.arena.model_copy(
            update={"ollama_url": self.url, "ollama_timeout_s": self.cfg.timeout_s})})
        try:
            created = await ollama_create(settings, row, artifacts, http_session=self.session)
        except OllamaError as exc:
            raise TargetError(str(exc)) from None
        return {"created": True, "tag": tag, "serve": "adapter", "adapters": created.get("adapters")}

    async def _create_merged(self, version: str, tag: str, files: dict[str, Any], template: str | None,
                             params: dict[str, Any]) -> dict[str, Any]:
        from academyd.ollama import OllamaError, ollama_create_merged

        if not files.get("gguf_path"):
            raise Refused("missing_artifact", f"{version} has no GGUF adapter (adapter.gguf) to merge into the base; "
                                              f"Ollama {self.version} creates no adapter models")
        merged, info = await self._merged_gguf(version, Path(files["gguf_path"]), files.get("gguf_sha256"))
        assert self.session is not None
        try:
            created = await ollama_create_merged(self.session, self.url, self.cfg.timeout_s, name=tag,
                                                 gguf_path=merged, template=template, parameters=params)
        except OllamaError as exc:
            raise TargetError(str(exc)) from None
        return {"created": True, "tag": tag, "serve": "merged", "merged_gguf": str(merged), "merge": info,
                "files": created.get("files")}

    async def _merged_gguf(self, version: str, adapter_gguf: Path, adapter_sha256: str | None,
                           ) -> tuple[Path, dict[str, Any]]:
        """The version's merged GGUF: the one the arena judged, or one made before, when it was merged from
        this very adapter; else merged now (in the trainer's interpreter, off the loop)."""
        from academyd.arena.contest import ArenaError, run_trainer_module
        from academyd.arena.merge_gguf import KEY_ADAPTER_SHA256, KEY_TYPE, merged_file_name
        from academyd.follower.verify import gguf_keys

        mtype = self.cfg.ollama_merge_type
        vdir = self.settings.models_dir / version
        want = adapter_sha256 or await asyncio.to_thread(_sha256_of, adapter_gguf)
        for path in (vdir / merged_file_name(mtype), vdir / "arena" / merged_file_name(mtype)):
            if path.is_file():
                keys = await asyncio.to_thread(gguf_keys, path)
                if keys.get(KEY_ADAPTER_SHA256) == want and keys.get(KEY_TYPE) == mtype:
                    return path, {"reused": str(path)}
        base = await asyncio.to_thread(base_gguf_of, self.settings)
        if base is None or not base.is_file():
            raise TargetError(f"no base GGUF to merge {version} into: set follower.base_gguf (the base Ollama's "
                              f"{self.base_name} was made from)")
        out = vdir / merged_file_name(mtype)
        try:
            info = await run_trainer_module(self.settings, "academyd.arena.merge_gguf",
                                            [str(base), str(adapter_gguf), str(out), "--type", mtype],
                                            time_limit_s=3600, what=f"the merge of {version} into {base.name}")
        except ArenaError as exc:
            if "exit 2" in str(exc):  # bad input: another base, not a LoRA
                raise Refused("load_failed", str(exc)) from None
            raise TargetError(str(exc)) from None
        log.info("ollama_merged", version=version, path=str(out), merge_s=info.get("merge_s"),
                 tensors=info.get("merged"), total_s=info.get("total_s"))
        return out, info

    async def ask(self, version: str | None, messages: list[dict[str, Any]], max_tokens: int) -> str:
        status, answer = await self._req("POST", f"{self.url}/api/chat", json={
            "model": self.tag(version), "messages": messages, "stream": False,
            "options": {"temperature": 0, "num_predict": max_tokens}})
        if status != 200:
            raise TargetError(f"Ollama chat with {self.tag(version)}: HTTP {status}: {_error_text(answer)}")
        return str((answer.get("message") or {}).get("content") or "")

    async def switch(self, version: str | None, files: dict[str, Any] | None) -> None:
        status, answer = await self._req("POST", f"{self.url}/api/copy", json={
            "source": self.tag(version), "destination": self.cfg.ollama_alias})
        if status != 200:
            raise TargetError(f"Ollama could not point {self.cfg.ollama_alias} at {self.tag(version)}: HTTP {status}: "
                              f"{_error_text(answer)}")
        self._serving = version

    async def discard(self, version: str) -> None:
        """A merged tag is a whole model (the base's size): removed once another serves. Its merged GGUF stays
        in the version's directory, so going back to it is an upload and a create, not a merge."""
        if not self.merged or version == self._serving:
            return
        status, answer = await self._req("DELETE", f"{self.url}/api/delete",
                                         json={"model": self.tag(version)})
        if status not in (200, 404):
            log.warning("ollama_delete_failed", tag=self.tag(version), status=status, error=_error_text(answer))


def _untagged(name: str) -> str:
    """Ollama's names carry `:latest` when no tag was given."""
    return name.removesuffix(":latest")


def _sha256_of(path: Path) -> str:
    from academyd.files import sha256_file

    return sha256_file(path)


# ------------------------------------------------------------------ Venom


VENOM_PREFIX = "venom-adapter-"
VENOM_GGUF = "adapter.gguf"  # inside adapter/: Venom deploys any adapter/*.gguf (registry.SERVING_COPIES)


def _venom_refusal(status: int, answer: Any, what: str) -> Exception:
    """Venom's answer to a refused call as a Refused with its reason_code (a 4xx, or a 5xx that names one);
    a 5xx without a code, or an unreadable answer, is a TargetError (tried again)."""
    detail = answer.get("detail") if isinstance(answer, dict) else None
    code = None
    if isinstance(detail, dict):
        code = detail.get("reason_code") or detail.get("error")
        text = str(detail.get("message") or detail)
    else:
        text = str(detail if detail is not None else _error_text(answer))
    if code is None and status == 404:
        code = "ADAPTER_NOT_FOUND"  # Venom answers {"detail": "Adapter not found"}: no code of its own
    if code is None and status >= 500:
        return TargetError(f"Venom could not {what}: HTTP {status}: {text}")
    return Refused("runtime_refused", f"Venom refused to {what}: HTTP {status}: {text}"[:2000], str(code or f"HTTP_{status}"))


class VenomTarget(Target):
    """Venom's own adapter API, as it really behaves (../shared/venom/academy-api.md; docs/follower.md).

    - stage: the version is installed where Venom reads it, `<models_dir>/<id>/` (Venom's
      ACADEMY_MODELS_DIR must be the Academy's models directory): the GGUF adapter inside `adapter/`
      (a hard link to `<id>/adapter.gguf`; the registry's adapter_sha256 leaves it out) and a canonical
      `metadata.json` v2 naming the base as Venom knows it (`follower.venom_base_models`);
    - switch: `activate` with `deploy_to_chat_runtime`, `runtime_id` and `model_id`; Venom creates
      `venom-adapter-<id>` in its runtime and chats with the reply's `chat_model`. Venom's deactivate goes
      one step back (to the model that served before the last activate), so before every activate the
      follower deactivates what is active: the step back from any adapter is then always the base.
      Back to the base: deactivate, then read where chat is; not on `model_id`: refused, saying where;
    - the probe asks the runtime's OpenAI endpoint (`venom_chat_url`) for the reply's `chat_model`;
    - serving: the truth, read back from `GET /api/v1/academy/adapters` and
      `GET /api/v1/system/llm-runtime/active` (the chat model in use);
    - a refusal becomes `runtime_refused` with Venom's `reason_code`; an activate refused after the
      deactivate activates the version that was active before again."""

    name = "venom"
    probe_first = False

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        missing = [k for k in ("venom_url", "venom_runtime_id", "venom_model_id", "venom_chat_url")
                   if not getattr(self.cfg, k)]
        if missing:
            raise TargetError("follower.target = venom needs " + ", ".join(f"follower.{k}" for k in missing))
        self.url = str(self.cfg.venom_url).rstrip("/")
        self.model_id = str(self.cfg.venom_model_id)
        self.models_dir = settings.models_dir
        self._chat: dict[str | None, str] = {}

    @property
    def runtime(self) -> str:
        return f"{self.url} ({self.cfg.venom_runtime_id} {self.model_id})"

    # ------------------------------------------------------------ the truth

    async def adapters(self) -> list[dict[str, Any]]:
        status, answer = await self._req("GET", f"{self.url}/api/v1/academy/adapters")
        if status != 200 or not isinstance(answer, list):
            raise TargetError(f"GET {self.url}/api/v1/academy/adapters answered HTTP {status}: {_error_text(answer)}")
        return answer

    async def chat_model(self) -> str:
        """The model Venom chats with now (`GET /api/v1/system/llm-runtime/active`)."""
        status, answer = await self._req("GET", f"{self.url}/api/v1/system/llm-runtime/active")
        if status != 200 or not isinstance(answer, dict):
            raise TargetError(f"GET {self.url}/api/v1/system/llm-runtime/active answered HTTP {status}: "
                              f"{_error_text(answer)}")
        for key in ("active_model", "model", "model_name"):
            if answer.get(key):
                return str(answer[key])
        raise TargetError(f"Venom's llm-runtime/active names no model: {str(answer)[:300]}")

    def _is_base(self, chat: str) -> bool:
        return chat.strip().lower() == self.model_id.strip().lower()

    async def truth(self) -> tuple[str | None, str]:
        """(the adapter Venom's registry says is active, the model chat is on)."""
        active = next((a.get("adapter_id") for a in await self.adapters() if a.get("is_active")), None)
        return active, await self.chat_model()

    async def serving(self) -> str | None:
        """What chat is on: None (the base), a version (`venom-adapter-<v>`), or `?<model>` (something else,
        never a version: it differs from every desired state)."""
        chat = await self.chat_model()
        if self._is_base(chat):
            return None
        if chat.startswith(VENOM_PREFIX):
            return chat[len(VENOM_PREFIX):]
        return f"?{chat}"

    # ------------------------------------------------------------ install, activate, deactivate

    def _install(self, version: str, files: dict[str, Any]) -> dict[str, Any]:
        from datetime import UTC, datetime

        from academyd.files import atomic_write_json

        adapter = Path(files["adapter_path"])
        vdir = self.models_dir / version
        if adapter.resolve() != (vdir / "adapter").resolve():
            raise Refused("missing_artifact", f"Venom reads <ACADEMY_MODELS_DIR>/<adapter_id>/adapter only; {adapter} "
                                              f"is not {vdir / 'adapter'}")
        base = files.get("base_model") or ""
        venom_base = self.cfg.venom_base_for(base)
        if venom_base is None:
            raise Refused("base_mismatch", f"follower.venom_base_models names no Venom model for the base {base!r} "
                                           f"of {version}; Venom would refuse it (ADAPTER_BASE_MODEL_MISMATCH)")
        placed = None
        if files.get("gguf_path") and Path(files["gguf_path"]).is_file():
            src, dst = Path(files["gguf_path"]), adapter / VENOM_GGUF
            if not dst.exists() or not os.path.samefile(src, dst):
                tmp = adapter / ".adapter.gguf.tmp"  # registry.SERVING_COPIES: outside adapter_sha256
                tmp.unlink(missing_ok=True)
                try:
                    os.link(src, tmp)
                except OSError:
                    import shutil

                    shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            placed = str(dst)
        meta = {"metadata_version": 2, "source_flow": "academyd",
                "created_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "base_model": venom_base, "effective_base_model": venom_base, "parameters": {}}
        atomic_write_json(vdir / "metadata.json", meta)
        return {"venom_metadata": str(vdir / "metadata.json"), "venom_base_model": venom_base, "venom_gguf": placed}

    async def stage(self, version: str, files: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self._install, version, files)

    async def _deactivate(self) -> dict[str, Any]:
        status, answer = await self._req("POST", f"{self.url}/api/v1/academy/adapters/deactivate?deploy_to_chat_runtime=true")
        if status != 200:
            raise _venom_refusal(status, answer, "deactivate")
        return answer if isinstance(answer, dict) else {}

    async def _activate(self, version: str) -> dict[str, Any]:
        body = {"adapter_id": version, "adapter_path": str(self.models_dir / version / "adapter"),
                "runtime_id": self.cfg.venom_runtime_id, "model_id": self.model_id,
                "deploy_to_chat_runtime": True, "require_chat_signature": False}
        status, answer = await self._req("POST", f"{self.url}/api/v1/academy/adapters/activate", json=body)
        if status != 200:
            raise _venom_refusal(status, answer, f"activate {version}")
        if not isinstance(answer, dict) or answer.get("success") is False or not answer.get("chat_model"):
            raise Refused("runtime_refused", f"Venom did not deploy {version} to chat: {str(answer)[:500]}",
                          "NOT_DEPLOYED")
        return answer

    async def switch(self, version: str | None, files: dict[str, Any] | None) -> None:
        active, chat = await self.truth()
        if version is None:
            await self._to_base(active, chat)
            return
        if active is not None or not self._is_base(chat):
            # One step back from here must be the base: leave the active adapter before activating another.
            if active is not None:
                await self._deactivate()
        try:
            reply = await self._activate(version)
        except Refused:
            if active is not None and active != version:
                try:  # put back what served (its files are installed: it was activated before)
                    await self._activate(active)
                except (Refused, TargetError) as exc:
                    log.warning("venom_restore_failed", version=active, error=str(exc))
            raise
        self._chat[version] = str(reply["chat_model"])

    async def _to_base(self, active: str | None, chat: str) -> None:
        if active is None and self._is_base(chat):
            return
        answer = await self._deactivate()
        after = await self.chat_model()
        if answer.get("success") is False:
            raise Refused("runtime_refused", f"Venom: {answer.get('message') or answer}; chat is on {after}, not the "
                          f"base {self.model_id}", "NO_ACTIVE_ADAPTER")
        if not self._is_base(after):
            raise Refused("base_unreachable", f"Venom deactivated {active} but chat is on {after}, not the base "
                          f"{self.model_id}: Venom's deactivate goes back one step (to PREVIOUS_MODEL_<server> in its "
                          f"env file), and that was not the base; set Venom's chat model to {self.model_id} there")

    async def ask(self, version: str | None, messages: list[dict[str, Any]], max_tokens: int) -> str:
        model = self._chat.get(version) or (VENOM_PREFIX + version if version else self.model_id)
        status, answer = await self._req("POST", str(self.cfg.venom_chat_url), json={
            "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": False})
        if status != 200:
            raise TargetError(f"{self.cfg.venom_chat_url} with {model}: HTTP {status}: {_error_text(answer)}")
        return str(answer["choices"][0]["message"].get("content") or "")


def make_target(settings: Settings) -> Target:
    kinds: dict[str, type[Target]] = {"llamacpp": LlamaCppTarget, "ollama": OllamaTarget, "venom": VenomTarget}
    return kinds[settings.follower.target](settings)

