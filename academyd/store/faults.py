"""What SQLite's errors mean to the daemon: a fault of the store itself (locked, disk I/O, disk full),
which no message caused and every message meets alike, or a refusal of one row (a constraint, a value
too big), which trying again does not change."""

from __future__ import annotations

import sqlite3

# Anything SQLite raises: a refused row or a fault of the store (`store_fault` tells which).
StoreError = sqlite3.Error

# SQLite primary result codes that mean the store itself is in trouble, whatever the message.
_FAULT_CODES = {
    5: "database is locked (SQLITE_BUSY)",
    6: "table is locked (SQLITE_LOCKED)",
    7: "out of memory (SQLITE_NOMEM)",
    8: "database is read-only (SQLITE_READONLY)",
    10: "disk I/O error (SQLITE_IOERR)",
    11: "database file is damaged (SQLITE_CORRUPT)",
    13: "disk is full (SQLITE_FULL)",
    14: "cannot open the database file (SQLITE_CANTOPEN)",
    15: "database lock protocol error (SQLITE_PROTOCOL)",
    26: "not a database file (SQLITE_NOTADB)",
}
_FAULT_WORDS = ("locked", "disk", "full", "readonly", "read-only", "unable to open", "malformed", "i/o")


class StoreFault(Exception):
    """The store cannot take writes now (locked, I/O error, disk full); nothing of the batch committed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def store_fault(exc: BaseException) -> StoreFault | None:
    """A StoreFault when `exc` is SQLite saying the store (not this message) is in trouble."""
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _FAULT_CODES:
        return StoreFault(_FAULT_CODES[code & 0xFF], f"{type(exc).__name__}: {exc}")
    if code is None and isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        if any(w in text for w in _FAULT_WORDS):
            return StoreFault(str(exc), f"{type(exc).__name__}: {exc}")
    return None
