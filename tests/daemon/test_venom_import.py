"""`import-venom` on the files Venom itself writes, against a real nats-server and daemon.

`VenomLessonsStore` and `VenomTask` below are upstream's code paths (mpieniak01/Venom at b5050aaa:
venom_core/memory/lessons_store.py `Lesson.to_dict` / `LessonsStore.save_lessons`, venom_core/core/models.py
`VenomTask`, venom_core/core/state_manager.py `StateManager._save`), cut down to what writes the files:
same shapes, same non-atomic `open(path, "w")` + `json.dump`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import uuid
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from academyd.curator.examples import history_turns
from fixtures.nats import daemon_cmd, daemon_env, wait_for


# ---------------------------------------------------------------- upstream Venom, as it writes its files


class VenomLesson:
    def __init__(self, situation: str, action: str, result: str, feedback: str, lesson_id: str | None = None,
                 timestamp: str | None = None, tags: list[str] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self.lesson_id = lesson_id or str(uuid.uuid4())
        self.timestamp = timestamp or datetime.now().isoformat()
        self.situation, self.action, self.result, self.feedback = situation, action, result, feedback
        self.tags = tags or []
        self.metadata = metadata or {}

    def to_dict(self) -> dict[str, Any]:
        return {"lesson_id": self.lesson_id, "timestamp": self.timestamp, "situation": self.situation,
                "action": self.action, "result": self.result, "feedback": self.feedback, "tags": self.tags,
                "metadata": self.metadata}


class VenomLessonsStore:
    def __init__(self, storage_path: Path) -> None:
        self.storage_path = storage_path
        self.storage_path.parent.mkdir(parents=True, exist_ok=True)
        self.lessons: dict[str, VenomLesson] = {}

    def add_lesson(self, lesson: VenomLesson) -> VenomLesson:
        self.lessons[lesson.lesson_id] = lesson
        self.save_lessons()
        return lesson

    def save_lessons(self) -> None:
        data = {"lessons": [lesson.to_dict() for lesson in self.lessons.values()], "count": len(self.lessons),
                "last_updated": datetime.now().isoformat()}
        with open(self.storage_path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)


class TaskStatus(str, Enum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class ContextUsed(BaseModel):
    lessons: list[str] = Field(default_factory=list)
    memory_entries: list[str] = Field(default_factory=list)


class VenomTask(BaseModel):
    model_config = ConfigDict(use_enum_values=True)

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    content: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    status: TaskStatus = TaskStatus.PENDING
    result: str | None = None
    logs: list[str] = Field(default_factory=list)
    context_history: dict[str, Any] = Field(default_factory=dict)
    context_used: ContextUsed | None = None


def save_state(path: Path, tasks: list[VenomTask]) -> None:
    data = {"tasks": [t.model_dump(mode="json") for t in tasks], "paid_mode_enabled": False, "autonomy_level": 0}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2, default=str)


# ---------------------------------------------------------------- the tests


def venom_memory(root: Path, n_lessons: int = 40) -> tuple[Path, VenomLessonsStore, list[VenomTask]]:
    mem = root / "data" / "memory"
    store = VenomLessonsStore(mem / "lessons.json")
    for i in range(n_lessons):
        store.add_lesson(VenomLesson(situation=f"Sytuacja {i}: import failed after an upgrade",
                                     action=f"Pinned package {i}", result="✅ Sukces" if i % 4 else "Błąd",
                                     feedback="Pin early", tags=["build"], metadata={"agent": "coder", "i": i}))
    task_id = uuid.uuid4()
    tasks = [
        VenomTask(id=task_id, content="Napisz haiku o kompilatorze", status=TaskStatus.COMPLETED,
                  result="Cisza w konsoli", logs=["start", "done"],
                  context_history={
                      "session": {"session_id": "s1"},
                      "session_history": [
                          {"role": "user", "content": "Cześć, kim jesteś?", "session_id": "s1",
                           "request_id": "earlier", "timestamp": "2026-11-01T10:00:00Z"},
                          {"role": "assistant", "content": "Jestem Venom.", "session_id": "s1",
                           "request_id": "earlier", "timestamp": "2026-11-01T10:00:01Z"},
                          {"role": "user", "content": "Napisz haiku o kompilatorze", "session_id": "s1",
                           "request_id": str(task_id), "timestamp": "2026-11-01T10:01:00Z"},
                      ]},
                  context_used=ContextUsed(lessons=["L1"], memory_entries=[])),
        VenomTask(content="Deploy", status=TaskStatus.FAILED, result=None, logs=["boom"]),
        VenomTask(content="Still thinking", status=TaskStatus.PROCESSING),
        VenomTask(content="Naive clock", status=TaskStatus.COMPLETED, result="ok",
                  created_at=datetime(2026, 11, 2, 8, 30)),  # naive: UTC in Venom
    ]
    save_state(mem / "state_dump.json", tasks)
    return mem, store, tasks


def run_import(root: Path, url: str) -> tuple[int, dict[str, Any], str]:
    out = subprocess.run(daemon_cmd("import-venom", str(root), "--nats-url", url, "--json"), env=daemon_env(),
                         capture_output=True, text=True, timeout=60)
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else {}, out.stderr


async def test_venoms_own_files_imported_twice_store_everything_once(make_settings, start_daemon, nats_server,
                                                                     tmp_path: Path) -> None:
    d = await start_daemon(make_settings())
    root = tmp_path / "venom"
    mem, lessons, tasks = venom_memory(root)
    code, first, err = run_import(root, nats_server.url)
    assert code == 0, err
    assert first["lessons"] == 40 and first["tasks"] == 3 and first["unfinished_tasks"] == 1 and first["bad"] == 0
    store = d.app.store
    await wait_for(lambda: store.counts()["lesson.created"] == 40 and store.counts()["task.completed"] == 3)
    assert store.snapshot().new_successful_lessons == 30  # Venom's rule: "sukces" / ✅ counts
    row = store.conn.execute("SELECT * FROM tasks WHERE task_id=?", (str(tasks[0].id),)).fetchone()
    assert json.loads(row["context_history"])["session"] == {"session_id": "s1"}
    assert json.loads(row["context_used"]) == {"lessons": ["L1"], "memory_entries": []}
    naive = store.conn.execute("SELECT created_at FROM tasks WHERE task_id=?", (str(tasks[3].id),)).fetchone()
    assert naive[0] == "2026-11-02T08:30:00+00:00"

    code, second, err = run_import(root, nats_server.url)
    assert code == 0, err
    assert second["published"] == 0 and second["duplicates"] == 43
    await asyncio.sleep(1.0)
    assert store.counts() == {"lesson.created": 40, "commit.pushed": 0, "task.completed": 3}
    assert store.dlq_count() == 0

    # Curation uses what the dict history holds: the earlier turns, not this task's own (it is the request).
    assert history_turns(json.loads(row["context_history"]), str(tasks[0].id)) == [
        ("human", "Cześć, kim jesteś?"), ("gpt", "Jestem Venom.")]


async def test_a_malformed_record_is_reported_and_the_rest_imported(make_settings, start_daemon, nats_server,
                                                                    tmp_path: Path) -> None:
    d = await start_daemon(make_settings())
    root = tmp_path / "venom"
    mem, lessons, tasks = venom_memory(root, n_lessons=10)
    doc = json.loads((mem / "lessons.json").read_text())
    del doc["lessons"][3]["action"]
    doc["lessons"][5]["situation"] = "x" * 100_000  # over the contract's field limit
    (mem / "lessons.json").write_text(json.dumps(doc))
    state = json.loads((mem / "state_dump.json").read_text())
    state["tasks"][1]["logs"] = "not a list"
    (mem / "state_dump.json").write_text(json.dumps(state))

    code, report, err = run_import(root, nats_server.url)
    assert code == 1
    assert report["bad"] == 3 and report["lessons"] == 8 and report["tasks"] == 2, report
    assert "lessons.json record 3" in err and "action" in err
    assert "lessons.json record 5" in err and "state_dump.json record 1" in err and "logs" in err
    await wait_for(lambda: d.app.store.counts()["lesson.created"] == 8 and d.app.store.counts()["task.completed"] == 2)


async def test_a_half_written_lessons_file_is_read_again(make_settings, start_daemon, nats_server,
                                                         tmp_path: Path) -> None:
    d = await start_daemon(make_settings())
    root = tmp_path / "venom"
    mem, lessons, _ = venom_memory(root, n_lessons=20)
    whole = (mem / "lessons.json").read_bytes()

    def venom_saving() -> None:  # Venom's open("w") + json.dump, caught in the middle
        with open(mem / "lessons.json", "wb", buffering=0) as f:
            f.write(whole[: len(whole) // 2])
            time.sleep(3.0)  # longer than the CLI takes to start and read it
            f.write(whole[len(whole) // 2:])

    writer = threading.Thread(target=venom_saving)
    writer.start()
    time.sleep(0.1)
    try:
        code, report, err = await asyncio.to_thread(run_import, root, nats_server.url)
    finally:
        writer.join()
    assert code == 0, err
    assert report["lessons"] == 20 and report["bad"] == 0
    await wait_for(lambda: d.app.store.counts()["lesson.created"] == 20)


def test_load_json_reads_a_half_written_file_again(tmp_path: Path) -> None:
    from academyd.venom_import import ImportError_, load_json

    path = tmp_path / "lessons.json"
    whole = json.dumps({"lessons": [{"lesson_id": "a"}], "count": 1})
    path.write_text(whole[:10])
    pauses: list[float] = []

    def sleep(s: float) -> None:  # Venom finishes its write while the importer waits
        pauses.append(s)
        path.write_text(whole)

    assert load_json(path, sleep=sleep)["count"] == 1 and len(pauses) == 1
    path.write_text(whole[:10])
    try:
        load_json(path, tries=3, sleep=lambda s: None)
    except ImportError_ as exc:
        assert "after 3 reads" in str(exc)
    else:
        raise AssertionError("a file that never parses must be reported")
