"""Nested transactions are SAVEPOINTs, on a real SQLite file: an inner failure undoes the inner writes
only and the outer transaction still commits; an outer failure undoes everything, released savepoints
too. What is committed is read back through a second connection, as another process would see it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from academyd.store import Store

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Boom(Exception):
    pass


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "academy.db")
    yield s
    s.close()


def committed(store: Store) -> set[str]:
    """The inbox rows another connection sees: what really committed."""
    other = sqlite3.connect(store.path)
    try:
        return {r[0] for r in other.execute("SELECT event_id FROM inbox")}
    finally:
        other.close()


def write(store: Store, event_id: str) -> None:
    assert store.claim(event_id, "lesson.created", None, NOW)


def test_an_inner_failure_undoes_only_the_inner_writes(store: Store) -> None:
    with store.transaction():
        write(store, "outer-1")
        with pytest.raises(Boom), store.transaction():
            write(store, "inner")
            raise Boom
        write(store, "outer-2")  # the outer transaction is still usable
        assert not store.conn.execute("SELECT 1 FROM inbox WHERE event_id='inner'").fetchone()
    assert committed(store) == {"outer-1", "outer-2"}
    assert not store.conn.in_transaction


def test_an_uncaught_inner_failure_fails_the_outer(store: Store) -> None:
    with pytest.raises(Boom), store.transaction():
        write(store, "outer")
        with store.transaction():
            write(store, "inner")
            raise Boom
    assert committed(store) == set()
    assert not store.conn.in_transaction


def test_an_outer_failure_undoes_released_savepoints_too(store: Store) -> None:
    with pytest.raises(Boom), store.transaction():
        write(store, "outer")
        with store.transaction():
            write(store, "inner")  # released: part of the outer transaction now
        raise Boom
    assert committed(store) == set()
    # and the store goes on: the next transaction commits
    with store.transaction():
        write(store, "after")
    assert committed(store) == {"after"}


def test_three_levels(store: Store) -> None:
    with store.transaction():
        write(store, "l1")
        with store.transaction():
            write(store, "l2")
            with pytest.raises(Boom), store.transaction():
                write(store, "l3")
                raise Boom
            write(store, "l2b")
            with store.transaction():
                write(store, "l3b")
        with pytest.raises(Boom), store.transaction():
            write(store, "l2-doomed")
            with store.transaction():
                write(store, "l3-doomed")  # released into l2-doomed, undone with it
            raise Boom
    assert committed(store) == {"l1", "l2", "l2b", "l3b"}


def test_nested_inside_begin_commit(store: Store) -> None:
    store.begin(busy_ms=1000)
    write(store, "batch-1")
    with pytest.raises(Boom), store.transaction():
        write(store, "bad")
        raise Boom
    with store.transaction():
        write(store, "batch-2")
    assert committed(store) == set()  # nothing before the COMMIT
    store.commit()
    assert committed(store) == {"batch-1", "batch-2"}
    # a rollback of the open-coded transaction undoes its released savepoints
    store.begin()
    with store.transaction():
        write(store, "rolled")
    store.rollback()
    assert committed(store) == {"batch-1", "batch-2"}
    with store.transaction():  # and a transaction() after it is an outer one again (BEGIN ... COMMIT)
        write(store, "later")
    assert committed(store) == {"batch-1", "batch-2", "later"}


def test_a_constraint_violation_inside_a_nested_block(store: Store) -> None:
    write(store, "taken")
    with store.transaction():
        write(store, "kept")
        with pytest.raises(sqlite3.IntegrityError), store.transaction():
            write(store, "undone")
            # SQLite itself refuses this row (the inbox's primary key)
            store.conn.execute("INSERT INTO inbox(event_id, subject, received_at) VALUES ('taken', 'x', 'y')")
        write(store, "kept-2")
    assert committed(store) == {"taken", "kept", "kept-2"}


def test_the_savepoint_stack_is_balanced_after_failures(store: Store) -> None:
    """Failures at every depth leave no savepoint open: the outer COMMIT really ends the transaction."""
    with store.transaction():
        for i in range(5):
            with pytest.raises(Boom), store.transaction():
                write(store, f"x{i}")
                with store.transaction():
                    raise Boom
    assert not store.conn.in_transaction
    assert committed(store) == set()
    with pytest.raises(sqlite3.OperationalError, match="no such savepoint"):
        store.conn.execute("RELEASE s1")
