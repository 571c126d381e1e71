"""The Academy's wire contract (part of the `academyd` project, not a general-purpose package).

Pydantic models for every subject the Academy hears, answers or publishes, and the JSON Schema files
generated from them (`academyd schemas export`) for agents in other languages and `nats pub` users.
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas.models import (
    ALL_SUBJECTS,
    COMMANDS,
    INBOUND,
    OUTBOUND,
    SCHEMA_VERSION,
    Event,
    OutEvent,
)

SCHEMA_DIR = Path(__file__).parent


def schema_documents() -> dict[str, str]:
    """File name -> JSON text, one JSON Schema per subject; deterministic so a test can diff it."""
    docs: dict[str, str] = {}
    for subject, model in sorted(ALL_SUBJECTS.items()):
        schema = model.model_json_schema()
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": subject, **schema}
        schema["title"] = subject
        docs[f"{subject}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return docs


def export(target: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema file into `target`, removing stale ones; return the written paths."""
    target.mkdir(parents=True, exist_ok=True)
    docs = schema_documents()
    for stale in target.glob("*.json"):
        if stale.name not in docs:
            stale.unlink()
    written = []
    for name, text in docs.items():
        path = target / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


__all__ = ["ALL_SUBJECTS", "COMMANDS", "INBOUND", "OUTBOUND", "SCHEMA_VERSION", "Event", "OutEvent", "export"]
