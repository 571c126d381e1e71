"""Artifacts through the JetStream Object Store: files and directories, sha256-checked, memory bounded.

Between the daemon and `academyd worker` processes nothing is shared but NATS: the dataset and the
held-out file go out, checkpoints, the adapter and the metrics come back. Every transfer here

- streams: `put` reads the file in the store's chunks (128 KiB) through a thread, `get` writes each chunk
  to a file as it arrives (`writeinto`; nats-py's in-memory `get()` concatenates with `bytes +=` and is
  quadratic, nats-io/nats.py#703), so memory stays at a few chunks whatever the size;
- is checked on arrival: the receiver hashes what it wrote and compares with the sha256 the sender
  computed from its file before sending (carried beside the object's name, e.g. in the job or the lease);
  a mismatch deletes the partial file and raises `ArtifactError`;
- lands atomically: into `<dest>.part`, fsynced, then renamed;
- is retried from its start, with exponential backoff, while JetStream answers "not now" (503 / no
  responders while a stream or consumer leader is elected, a request timeout, a reconnect): `transient`.
  A healthy R3 cluster answers a fresh pull consumer's first fetch with 503 about 1.6 % of the time.
  `retry_s` bounds the retrying (None: until the caller cancels, as a worker's lease does).

No rollup and no purge on the way: a put publishes the chunks and then the meta (the store's layout,
ADR-20) without the `Nats-Rollup` header nats-py's `put` sends, and never purges an older object of the
same name (names are unique per writer and attempt); the buckets' streams refuse rollup headers
(academyd.worker.protocol.refuse_rollups), and a worker may not purge. A get given the object's `nuid`
reads those chunks, whatever meta was published under the name since.

A directory travels as one uncompressed tar (deterministic member order, no owners), extracted with
the `data` filter (no absolute paths, no links out, no devices).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import structlog
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    ObjectInfo,
    ObjectMeta,
    ObjectMetaOptions,
    ObjectStoreConfig,
    StorageType,
)
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError, ServiceUnavailableError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay, stop_never
from tenacity import wait_exponential_jitter

from academyd.files import replace_durably

CHUNK = 1024 * 1024
RETRY_S = 120.0  # how long a transfer is retried by default (a leader election takes seconds)
RETRY_WAIT_MAX_S = 5.0

log = structlog.get_logger("academyd.artifacts")
T = TypeVar("T")


class ArtifactError(Exception):
    """An artifact is missing or arrived damaged; the message names it and what to do."""


def transient(exc: BaseException) -> bool:
    """JetStream said "not now", not "no": no leader or no responders (503), a request or fetch timeout,
    a connection being re-established. Worth the same request again a little later."""
    if isinstance(exc, ServiceUnavailableError):  # a fetch's 503 status carries no code
        return True
    if isinstance(exc, APIError):
        return exc.code in (503, 408)  # no leader; a request timed out inside the cluster
    return isinstance(exc, (nats.errors.NoRespondersError, nats.errors.TimeoutError, asyncio.TimeoutError,
                            nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError,
                            nats.errors.FlushTimeoutError))


async def retrying(what: str, name: str, attempt: Callable[[], Awaitable[T]], *, retry_s: float | None) -> T:
    """`attempt()` again from its start while it fails with a `transient` error: exponential backoff with
    jitter (0.2 s doubling up to 5 s), for `retry_s` seconds (None: until cancelled); other errors at once."""
    def said(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("artifact_transfer_retry", transfer=what, name=name, attempt=state.attempt_number,
                    error=f"{type(exc).__name__}: {exc}", retry_in_s=round(state.upcoming_sleep, 2))

    async for tried in AsyncRetrying(
        retry=retry_if_exception(transient), reraise=True, before_sleep=said,
        wait=wait_exponential_jitter(multiplier=0.2, max=RETRY_WAIT_MAX_S, jitter=0.2),
        stop=stop_never if retry_s is None else stop_after_delay(retry_s),
    ):
        with tried:
            return await attempt()
    raise AssertionError("unreachable")  # AsyncRetrying returns or raises


@dataclass(frozen=True)
class Artifact:
    """An object in the store: its name, the sha256 (hex) of its bytes and its size."""

    name: str
    sha256: str
    size: int
    nuid: str | None = None  # the subject token of its chunks (`$O.<bucket>.C.<nuid>`)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        return cls(name=str(d["name"]), sha256=str(d["sha256"]), size=int(d["size"]))


OBJ_CHUNK = 128 * 1024  # the store's chunk size (nats-py's default too)


@dataclass(frozen=True)
class ArtifactStore:
    """A bucket of the Object Store and the JetStream context it lives in."""

    js: Any
    bucket: str
    obj: Any  # nats.js.object_store.ObjectStore

    async def put(self, name: str, data: Any, meta: ObjectMeta) -> Any:
        """`data` (a reader with `readinto`) as object `name`: its chunks on a new nuid, then its meta, with
        no rollup header and no purge of what the name held before (module docstring)."""
        nuid = self.js._nc._nuid.next().decode()
        chunk_subject = f"$O.{self.bucket}.C.{nuid}"
        h = hashlib.sha256()
        buf = bytearray(OBJ_CHUNK)
        size = chunks = 0
        while n := await asyncio.to_thread(data.readinto, buf):
            payload = bytes(buf[:n])
            h.update(payload)
            await self.js.publish(chunk_subject, payload)
            size += n
            chunks += 1
        info = ObjectInfo(name=name, description=meta.description, headers=meta.headers,
                          options=ObjectMetaOptions(max_chunk_size=OBJ_CHUNK), bucket=self.bucket, nuid=nuid,
                          size=size, chunks=chunks, mtime=datetime.now(UTC).isoformat(),
                          digest="SHA-256=" + base64.urlsafe_b64encode(h.digest()).decode())
        meta_subject = f"$O.{self.bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
        await self.js.publish(meta_subject, json.dumps(info.as_dict()).encode())
        return info

    async def get_info(self, name: str) -> Any:
        return await self.obj.get_info(name)


async def ensure_bucket(js: Any, bucket: str, *, replicas: int = 1, ttl_s: float | None = None) -> ArtifactStore:
    """The object store `bucket`, created (file storage, `replicas`, objects expire after `ttl_s`) if missing."""
    try:
        obj = await js.object_store(bucket)
    except (BucketNotFoundError, NotFoundError):
        obj = await js.create_object_store(bucket, config=ObjectStoreConfig(
            description="The Academy's artifacts: datasets out to workers, checkpoints and adapters back",
            storage=StorageType.FILE, replicas=replicas, ttl=ttl_s,
        ))
    return ArtifactStore(js=js, bucket=bucket, obj=_NoRollups(obj, js, bucket))


class _NoRollups:
    """nats-py's ObjectStore, but `delete` purges the object's subjects instead of publishing a meta with a
    rollup header (which the bucket's stream refuses: academyd.worker.protocol.refuse_rollups)."""

    def __init__(self, obj: Any, js: Any, bucket: str) -> None:
        self._obj, self._js, self._bucket = obj, js, bucket

    def __getattr__(self, name: str) -> Any:
        return getattr(self._obj, name)

    async def delete(self, name: str) -> None:
        info = await self._obj.get_info(name)  # ObjectNotFoundError (a NotFoundError) when there is none
        await delete_object(ArtifactStore(js=self._js, bucket=self._bucket, obj=self._obj), info)


def _digest_hex(info: Any) -> str:
    """The store's own SHA-256 of an object (`SHA-256=<base64url>`) as hex."""
    raw = (info.digest or "").split("=", 1)[-1]
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()


class _HashingReader:
    """A file reader that hashes what it hands out (the store's put reads it with readinto)."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.h = hashlib.sha256()
        self.size = 0

    def readinto(self, buf: Any) -> int:
        n = self.fh.readinto(buf)
        if n:
            self.h.update(memoryview(buf)[:n])
            self.size += n
        return int(n or 0)


class _HashingWriter:
    """A file writer that hashes what it writes (the store's get calls write once per chunk, in order)."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.h = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.size += len(data)
        return int(self.fh.write(data))


async def put_file(store: ArtifactStore, name: str, path: Path, *, description: str | None = None,
                   retry_s: float | None = RETRY_S) -> Artifact:
    """Upload `path` as `name`; returns the sha256 computed from the bytes read (and checked by the store).
    Transient errors are retried from the start for `retry_s` (module docstring)."""
    return await retrying("put", name, lambda: _put_once(store, name, path, description), retry_s=retry_s)


async def _put_once(store: ArtifactStore, name: str, path: Path, description: str | None) -> Artifact:
    def opener() -> Any:
        return path.open("rb")

    fh = await asyncio.to_thread(opener)
    try:
        reader = _HashingReader(fh)
        info = await store.put(name, reader, meta=ObjectMeta(name=name, description=description))
    finally:
        await asyncio.to_thread(fh.close)
    sha = reader.h.hexdigest()
    if _digest_hex(info) != sha or int(info.size or 0) != reader.size:
        raise ArtifactError(f"object {name}: the store recorded another digest than the bytes sent; upload again")
    return Artifact(name=name, sha256=sha, size=reader.size, nuid=info.nuid)


async def get_file(store: ArtifactStore, name: str, dest: Path, *, sha256: str | None = None,
                   retry_s: float | None = RETRY_S, pinned: Artifact | None = None) -> Artifact:
    """Download `name` into `dest` (atomically); raise ArtifactError unless its sha256 is `sha256`.
    Transient errors are retried from the start for `retry_s` (module docstring). With `pinned` (an
    Artifact with its nuid, as the lease or the job recorded it), its chunks are read, not the newest meta's.

    The chunks are pulled a few at a time from the bucket's stream (the object store's layout, ADR-20:
    `$O.<bucket>.C.<nuid>`), not pushed: nats-py's `get(writeinto=)` lets the server push as fast as it
    can, and the client's buffer grew with the object (28 MB heap for 96 MB here).
    """
    try:
        return await retrying("get", name, lambda: _get_once(store, name, dest, sha256, pinned), retry_s=retry_s)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"object {name} could not be read: {type(exc).__name__}: {exc}") from None


async def _get_once(store: ArtifactStore, name: str, dest: Path, sha256: str | None,
                    pinned: Artifact | None = None) -> Artifact:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if pinned is not None and pinned.nuid:
        digest = "SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(pinned.sha256)).decode()
        info = ObjectInfo(name=name, bucket=store.bucket, nuid=pinned.nuid, size=pinned.size,
                          chunks=-(-pinned.size // OBJ_CHUNK), digest=digest)
    else:
        try:
            info = await store.get_info(name)
        except NotFoundError:
            raise ArtifactError(f"object {name} is not in the artifact store (expired or never uploaded)") from None
    fh = await asyncio.to_thread(part.open, "wb")
    writer = _HashingWriter(fh)
    try:
        await _pull_chunks(store, info, writer)
        await asyncio.to_thread(_sync_close, fh)
    except BaseException:
        await asyncio.to_thread(fh.close)
        part.unlink(missing_ok=True)
        raise
    got = writer.h.hexdigest()
    if got != _digest_hex(info) or writer.size != int(info.size or 0):
        part.unlink(missing_ok=True)
        raise ArtifactError(f"object {name} arrived incomplete or damaged (sha256 {got}); download it again")
    if sha256 is not None and got != sha256:
        part.unlink(missing_ok=True)
        raise ArtifactError(f"object {name} arrived with sha256 {got}, expected {sha256}: damaged or replaced; "
                            "it was not used")
    await asyncio.to_thread(replace_durably, part, dest)
    return Artifact(name=name, sha256=got, size=writer.size, nuid=info.nuid)


PULL_BATCH = 8  # chunks in flight: 8 x 128 KiB


async def _pull_chunks(store: ArtifactStore, info: Any, writer: _HashingWriter) -> None:
    chunks = int(info.chunks or 0)
    if chunks == 0:
        return
    bucket = store.bucket
    psub = await store.js.pull_subscribe(
        f"$O.{bucket}.C.{info.nuid}", stream=f"OBJ_{bucket}",
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                              inactive_threshold=60.0, max_waiting=1),
        pending_msgs_limit=PULL_BATCH * 2,
    )
    try:
        seen = 0
        while seen < chunks:
            msgs = await psub.fetch(min(PULL_BATCH, chunks - seen), timeout=10)
            for msg in msgs:
                await asyncio.to_thread(writer.write, msg.data)
                seen += 1
    finally:
        try:
            await psub.unsubscribe()
        except Exception:
            pass


def _sync_close(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


def _tar_dir(src: Path, out: Path) -> None:
    def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = 0
        return ti

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(src.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue  # only plain files and folders travel
            tar.add(path, arcname=path.relative_to(src).as_posix(), recursive=False, filter=clean)


def _untar(archive: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive, "r") as tar:
        tar.extractall(tmp, filter="data")
    if dest.exists():
        shutil.rmtree(dest)
    replace_durably(tmp, dest)


async def put_dir(store: ArtifactStore, name: str, src: Path, *, scratch: Path | None = None,
                  retry_s: float | None = RETRY_S) -> Artifact:
    """Upload the directory `src` as one tar object `name` (spooled through a temporary file, not memory)."""
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".artifact-") as tmp:
        archive = Path(tmp) / "dir.tar"
        await asyncio.to_thread(_tar_dir, src, archive)
        return await put_file(store, name, archive, retry_s=retry_s)


async def get_dir(store: ArtifactStore, name: str, dest: Path, *, sha256: str | None = None,
                  retry_s: float | None = RETRY_S, pinned: Artifact | None = None) -> Artifact:
    """Download the tar object `name`, check its sha256, and extract it to `dest` (replacing it)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".artifact-") as tmp:
        archive = Path(tmp) / "dir.tar"
        art = await get_file(store, name, archive, sha256=sha256, retry_s=retry_s, pinned=pinned)
        try:
            await asyncio.to_thread(_untar, archive, dest)
        except (tarfile.TarError, OSError) as exc:
            raise ArtifactError(f"object {name} is not a readable directory archive: {exc}") from None
        return art


async def delete_object(store: ArtifactStore, info: Any) -> None:
    """Delete one object by purging its subjects: the chunks of every meta published under its name (with
    no rollup, an upload over a name leaves the earlier ones), then the metas. No rollup header (the
    streams refuse them); the daemon's identity may purge, a worker's may not."""
    stream = f"OBJ_{store.bucket}"
    meta = f"$O.{store.bucket}.M.{base64.urlsafe_b64encode(info.name.encode()).decode()}"
    nuids, seq = {info.nuid}, 1
    while True:
        try:
            msg = await store.js.get_msg(stream, seq, subject=meta, next=True)
        except NotFoundError:
            break
        seq = int(msg.seq) + 1
        with contextlib.suppress(ValueError, TypeError, KeyError):
            nuids.add(json.loads(msg.data)["nuid"])
    for nuid in sorted(n for n in nuids if n):
        await store.js.purge_stream(stream, subject=f"$O.{store.bucket}.C.{nuid}")
    await store.js.purge_stream(stream, subject=meta)


async def delete_prefix(store: ArtifactStore, prefix: str) -> int:
    """Delete every object whose name starts with `prefix`; how many were deleted."""
    try:
        infos = await store.obj.list(ignore_deletes=True)
    except NotFoundError:
        return 0
    n = 0
    for info in infos:
        if info.name.startswith(prefix) and not info.deleted:
            try:
                await delete_object(store, info)
                n += 1
            except NotFoundError:
                pass
    return n
