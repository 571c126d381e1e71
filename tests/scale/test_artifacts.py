"""Artifacts through a real nats-server's Object Store: sha256 checked on arrival, memory bounded, atomic."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path

import pytest

from academyd.artifacts import ArtifactError, ensure_bucket, get_dir, get_file, put_dir, put_file
from academyd.files import sha256_file


async def test_a_file_round_trips_with_its_sha256_and_bounded_memory(nc, tmp_path: Path) -> None:
    js = nc.jetstream()
    store = await ensure_bucket(js, "t_artifacts")
    src = tmp_path / "daemon" / "big.bin"
    src.parent.mkdir()
    with src.open("wb") as fh:
        for _ in range(24):
            fh.write(os.urandom(1024 * 1024))
    tracemalloc.start()
    sent = await put_file(store, "runs/r1/big.bin", src)
    _, put_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    got = await get_file(store, "runs/r1/big.bin", tmp_path / "worker" / "big.bin", sha256=sent.sha256)
    _, get_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sent.sha256 == sha256_file(src) == got.sha256 == sha256_file(tmp_path / "worker" / "big.bin")
    assert sent.size == got.size == 24 * 1024 * 1024
    # 24 MiB moved each way; the Python heap never held more than a few chunks of it.
    assert put_peak < 8 * 1024 * 1024, put_peak
    assert get_peak < 8 * 1024 * 1024, get_peak


async def test_a_wrong_sha256_is_refused_and_leaves_no_file(nc, tmp_path: Path) -> None:
    store = await ensure_bucket(nc.jetstream(), "t_artifacts")
    src = tmp_path / "a.txt"
    src.write_text("hello\n")
    await put_file(store, "a", src)
    dest = tmp_path / "out" / "a.txt"
    with pytest.raises(ArtifactError, match="expected"):
        await get_file(store, "a", dest, sha256=hashlib.sha256(b"something else").hexdigest())
    assert not dest.exists() and not list(dest.parent.iterdir())
    with pytest.raises(ArtifactError, match="not in the artifact store"):
        await get_file(store, "missing", dest)


async def test_a_directory_round_trips_without_links(nc, tmp_path: Path) -> None:
    store = await ensure_bucket(nc.jetstream(), "t_artifacts")
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text('{"r": 16}')
    (src / "sub" / "weights.bin").write_bytes(os.urandom(300_000))
    (src / "escape").symlink_to("/etc/passwd")
    art = await put_dir(store, "runs/r1/adapter.tar", src)
    dest = tmp_path / "elsewhere" / "adapter"
    got = await get_dir(store, "runs/r1/adapter.tar", dest, sha256=art.sha256)
    assert got.sha256 == art.sha256
    assert (dest / "adapter_config.json").read_text() == '{"r": 16}'
    assert (dest / "sub" / "weights.bin").read_bytes() == (src / "sub" / "weights.bin").read_bytes()
    assert not (dest / "escape").exists()  # only plain files travel


async def test_without_rollups_an_object_is_read_by_its_chunks_and_deleted_by_purges(nc, tmp_path: Path) -> None:
    """The bucket's stream refuses rollup headers (academyd.worker.protocol.refuse_rollups): puts and deletes
    here need none; a get pinned to an object's nuid reads those chunks whatever meta came under its name."""
    from academyd.artifacts import delete_prefix
    from academyd.worker.protocol import refuse_rollups

    js = nc.jetstream()
    store = await ensure_bucket(js, "t_norollup")
    await refuse_rollups(js, "OBJ_t_norollup")
    assert (await js.stream_info("OBJ_t_norollup")).config.allow_rollup_hdrs is False
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(os.urandom(300_000))
    second.write_bytes(b"replaced" * 1000)
    sent = await put_file(store, "runs/r1/a.bin", first)
    over = await put_file(store, "runs/r1/a.bin", second)  # over the name: the newest meta is this one
    assert sent.nuid and over.nuid and sent.nuid != over.nuid
    newest = await get_file(store, "runs/r1/a.bin", tmp_path / "newest.bin")
    assert newest.sha256 == over.sha256
    pinned = await get_file(store, "runs/r1/a.bin", tmp_path / "pinned.bin", sha256=sent.sha256, pinned=sent)
    assert pinned.sha256 == sent.sha256 and (tmp_path / "pinned.bin").read_bytes() == first.read_bytes()
    await put_file(store, "runs/r1/b.bin", second)
    await store.obj.delete("runs/r1/b.bin")
    with pytest.raises(ArtifactError, match="not in the artifact store"):
        await get_file(store, "runs/r1/b.bin", tmp_path / "b.bin")
    assert await delete_prefix(store, "runs/r1/") == 1
    assert (await js.stream_info("OBJ_t_norollup")).state.messages == 0
