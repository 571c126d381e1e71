"""The SQLite connection: opening it (WAL, `synchronous=FULL`, foreign keys), migrations, transactions.

Transactions nest: the outermost `transaction()` is BEGIN IMMEDIATE ... COMMIT, a nested one is a
SAVEPOINT released at its end. An exception out of a nested block rolls back that block's writes only and
goes on up; the outer transaction fails with it unless the caller catches it, and then the outer
transaction is still usable. `begin()/commit()/rollback()` open-code the outermost level for a caller
that commits elsewhere (ingest commits on a worker thread); a `transaction()` inside is a savepoint too.

The table groups (academyd.store.inbox, .runs, ...) are classes over this one; `academyd.store.Store`
is all of them on one connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from academyd.store.migrations import migrate

BUSY_MS = 30000


class Connection:
    """One SQLite connection. Not thread-safe: one per thread (open another for worker threads)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        if readonly:
            # The daemon's file as it is (no migration, no write): for the CLI beside a running daemon.
            self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                        check_same_thread=False, timeout=10.0)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                        timeout=BUSY_MS / 1000)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        self.conn.row_factory = sqlite3.Row
        self._depth = 0

    @classmethod
    def open(cls, path: Path) -> Self:
        """Open (creating it if need be) and migrate the database at `path`."""
        store = cls(path)
        store.migrate()
        return store

    @classmethod
    def open_readonly(cls, path: Path) -> Self:
        """Open the database at `path` read-only, as it is; FileNotFoundError when there is none."""
        if not path.is_file():
            raise FileNotFoundError(path)
        return cls(path, readonly=True)

    def close(self) -> None:
        self.conn.close()

    def migrate(self) -> list[str]:
        """Apply the migrations not yet applied; return their names."""
        return migrate(self)

    # ------------------------------------------------------------ transactions

    @contextmanager
    def transaction(self, busy_ms: int | None = None) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; a nested call is a SAVEPOINT inside it (see the module's docstring).

        `busy_ms` bounds the wait for another connection's write lock (the default waits 30 s); it has no
        effect on a nested call (the lock is held already).
        """
        if self._depth:
            yield from self._savepoint()
            return
        self._begin(busy_ms)
        self._depth = 1
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        self._depth = 0

    def _savepoint(self) -> Iterator[None]:
        name = f"s{self._depth}"  # unique along the stack of open savepoints
        self.conn.execute(f"SAVEPOINT {name}")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            # When SQLite rolled the whole transaction back by itself (disk full, I/O error) there is no
            # savepoint left to go back to: the outer level meets the same state; the error matters.
            if self.conn.in_transaction:
                try:
                    self.conn.execute(f"ROLLBACK TO {name}")
                    self.conn.execute(f"RELEASE {name}")
                except sqlite3.Error:
                    pass
            raise
        self._depth -= 1
        self.conn.execute(f"RELEASE {name}")

    # Outside ingest, a transaction commits on the loop: measured on this project's 2-core VM (WAL,
    # synchronous=FULL, 200 one-row commits) 0.33 ms median, 0.83 ms at most. Moving those COMMITs to a
    # thread would let other coroutines write into the open transaction of the loop's one connection (this
    # class is not thread-safe), for under a millisecond: they stay here.
    #
    # An open-coded transaction for a caller that commits elsewhere (ingest commits on a worker thread so
    # that the fsync overlaps the event loop): begin() ... commit() or rollback(); a transaction() inside
    # it is a savepoint, as inside an outer transaction().

    def begin(self, busy_ms: int | None = None) -> None:
        self._begin(busy_ms)
        self._depth = 1

    def commit(self) -> None:
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        self._depth = 0

    def rollback(self) -> None:
        self._depth = 0
        if self.conn.in_transaction:  # SQLite may have rolled back by itself (disk full, I/O error)
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _begin(self, busy_ms: int | None) -> None:
        if busy_ms is None:
            self.conn.execute("BEGIN IMMEDIATE")
            return
        self.conn.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        finally:
            self.conn.execute(f"PRAGMA busy_timeout={BUSY_MS}")

    # ------------------------------------------------------------ small reads

    def scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def has_table(self, name: str) -> bool:
        return bool(self.scalar("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)))

    def has_column(self, table: str, column: str) -> bool:
        return any(r[1] == column for r in self.conn.execute(f"PRAGMA table_info({table})"))


def probe_write(path: Path, busy_ms: int) -> None:
    """Raise sqlite3.Error unless the database at `path` takes a real write now.

    Its own connection (the caller's may be in use on another thread) writes and deletes a 64 KiB row and
    commits with `synchronous=FULL`, so a full disk or a write lock held elsewhere shows here.
    """
    conn = sqlite3.connect(path, isolation_level=None, timeout=busy_ms / 1000)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE IF NOT EXISTS ingest_probe(id INTEGER PRIMARY KEY, pad BLOB)")
        conn.execute("INSERT OR REPLACE INTO ingest_probe(id, pad) VALUES (1, zeroblob(65536))")
        conn.execute("DELETE FROM ingest_probe")
        conn.execute("COMMIT")
    finally:
        try:
            conn.close()
        except sqlite3.Error:
            pass
