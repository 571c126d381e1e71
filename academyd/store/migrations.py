"""The schema: named SQL scripts applied once, in order, each in its own transaction.

A new table group adds its migration at the end under a name of its own; a script never changes once
released (a later one alters what an earlier one made).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from academyd.clock import iso, utcnow

if TYPE_CHECKING:
    from academyd.store.connection import Connection

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_core",
        """
        CREATE TABLE inbox(
            event_id    TEXT PRIMARY KEY,
            subject     TEXT NOT NULL,
            stream_seq  INTEGER,
            received_at TEXT NOT NULL
        );
        CREATE TABLE lessons(
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id    TEXT NOT NULL UNIQUE REFERENCES inbox(event_id),
            lesson_id   TEXT NOT NULL UNIQUE,
            timestamp   TEXT NOT NULL,
            situation   TEXT NOT NULL,
            action      TEXT NOT NULL,
            result      TEXT NOT NULL,
            feedback    TEXT,
            tags        TEXT NOT NULL,
            metadata    TEXT NOT NULL,
            success     INTEGER NOT NULL,
            received_at TEXT NOT NULL
        );
        CREATE INDEX lessons_success ON lessons(success, seq);
        CREATE TABLE commits(
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id    TEXT NOT NULL UNIQUE REFERENCES inbox(event_id),
            repo        TEXT NOT NULL,
            sha         TEXT NOT NULL,
            branch      TEXT NOT NULL,
            message     TEXT,
            author      TEXT,
            pushed_at   TEXT,
            received_at TEXT NOT NULL,
            UNIQUE(repo, sha)
        );
        CREATE TABLE tasks(
            seq             INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id        TEXT NOT NULL UNIQUE REFERENCES inbox(event_id),
            task_id         TEXT NOT NULL UNIQUE,
            content         TEXT NOT NULL,
            result          TEXT,
            status          TEXT NOT NULL,
            logs            TEXT NOT NULL,
            context_history TEXT,
            model_version   TEXT,
            success         INTEGER NOT NULL,
            received_at     TEXT NOT NULL
        );
        CREATE INDEX tasks_model ON tasks(model_version, seq);
        CREATE TABLE dlq(
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            subject     TEXT NOT NULL,
            event_id    TEXT,
            stream_seq  INTEGER,
            reason      TEXT NOT NULL,
            detail      TEXT,
            excerpt     TEXT,
            at          TEXT NOT NULL,
            UNIQUE(subject, stream_seq)
        );
        CREATE TABLE outbox(
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            msg_id       TEXT NOT NULL UNIQUE,
            subject      TEXT NOT NULL,
            payload      TEXT NOT NULL,
            created_at   TEXT NOT NULL,
            published_at TEXT,
            attempts     INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX outbox_pending ON outbox(id) WHERE published_at IS NULL;
        CREATE TABLE runs(
            run_id           TEXT PRIMARY KEY,
            state            TEXT NOT NULL CHECK(state IN ('requested','curating','training','evaluating',
                                                           'succeeded','failed','refused','cancelled')),
            reason           TEXT NOT NULL,
            forced           INTEGER NOT NULL,
            lesson_watermark INTEGER NOT NULL,
            new_lessons      INTEGER NOT NULL,
            requested_at     TEXT NOT NULL,
            started_at       TEXT,
            ended_at         TEXT,
            attempt          INTEGER NOT NULL DEFAULT 1,
            dataset_id       TEXT,
            version          TEXT,
            habitat          TEXT,
            job_ref          TEXT,
            error            TEXT,
            detail           TEXT NOT NULL DEFAULT '{}'
        );
        -- The database itself enforces at most one active run, across restarts and processes.
        CREATE UNIQUE INDEX runs_one_active
            ON runs((state IN ('requested','curating','training','evaluating')))
            WHERE state IN ('requested','curating','training','evaluating');
        CREATE INDEX runs_ended ON runs(state, ended_at);
        """,
    ),
    (
        # academyd.curator: every dataset build (refused ones too), and the split every source record
        # was first given, so that a record once held out stays held out in every later build.
        "0002_datasets",
        """
        CREATE TABLE datasets(
            dataset_id    TEXT PRIMARY KEY,
            run_id        TEXT,
            created_at    TEXT NOT NULL,
            format        TEXT NOT NULL,
            path          TEXT,
            heldout_path  TEXT,
            manifest_path TEXT,
            content_hash  TEXT,
            examples      INTEGER NOT NULL,
            heldout       INTEGER NOT NULL,
            counts        TEXT NOT NULL,
            dropped       TEXT NOT NULL,
            refused       TEXT,
            manifest      TEXT NOT NULL
        );
        CREATE INDEX datasets_created ON datasets(created_at);
        CREATE TABLE dataset_members(
            record_key       TEXT PRIMARY KEY,
            split            TEXT NOT NULL CHECK(split IN ('train','heldout')),
            first_dataset_id TEXT NOT NULL
        );
        """,
    ),
    (
        # academyd.registry: every adapter version with its genealogy, the `champion` alias, and what
        # happened to each version (evaluated, promoted, rolled back) in order.
        "0003_registry",
        """
        CREATE TABLE models(
            version        TEXT PRIMARY KEY,
            seq            INTEGER NOT NULL UNIQUE,
            parent         TEXT REFERENCES models(version),
            run_id         TEXT UNIQUE,
            base_model     TEXT NOT NULL,
            dataset_id     TEXT,
            dataset_hash   TEXT,
            dataset_format TEXT,
            heldout_path   TEXT,
            spec_hash      TEXT,
            backend        TEXT,
            packages       TEXT NOT NULL DEFAULT '{}',
            adapter_path   TEXT NOT NULL,
            adapter_sha256 TEXT NOT NULL,
            metrics        TEXT NOT NULL DEFAULT '{}',
            verdict        TEXT,
            status         TEXT NOT NULL CHECK(status IN ('candidate','champion','retired','rejected')),
            created_at     TEXT NOT NULL,
            evaluated_at   TEXT,
            promoted_at    TEXT,
            artifacts      TEXT NOT NULL DEFAULT '{}'
        );
        CREATE UNIQUE INDEX models_one_champion ON models(status) WHERE status='champion';
        CREATE TABLE model_aliases(
            alias      TEXT PRIMARY KEY,
            version    TEXT REFERENCES models(version),
            updated_at TEXT NOT NULL
        );
        CREATE TABLE model_history(
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            version TEXT NOT NULL REFERENCES models(version),
            action  TEXT NOT NULL,
            reason  TEXT NOT NULL,
            at      TEXT NOT NULL
        );
        CREATE INDEX model_history_version ON model_history(version, id);
        """,
    ),
]


MIGRATIONS.append((
    # academyd.outbox: a row that keeps failing is parked (with its error) instead of blocking later rows;
    # published rows are pruned after outbox.retention_h.
    "0004_outbox_parking",
    """
    ALTER TABLE outbox ADD COLUMN last_error TEXT;
    ALTER TABLE outbox ADD COLUMN last_attempt_at TEXT;
    ALTER TABLE outbox ADD COLUMN parked_at TEXT;
    DROP INDEX outbox_pending;
    CREATE INDEX outbox_pending ON outbox(id) WHERE published_at IS NULL AND parked_at IS NULL;
    CREATE INDEX outbox_published ON outbox(published_at) WHERE published_at IS NOT NULL;
    """,
))


MIGRATIONS.append((
    # Venom's task as Venom writes it: when it was created and which lessons/memory it was given.
    "0005_venom_task_shape",
    """
    ALTER TABLE tasks ADD COLUMN created_at TEXT;
    ALTER TABLE tasks ADD COLUMN context_used TEXT;
    """,
))


MIGRATIONS.append((
    # academyd.champion.moves: every champion move (promote, rollback) in commit order, with what it acted on
    # (`basis`: a verdict's or a watch decision's id, usable once); academyd.champion.monitor: what the
    # watch did about a champion (rolled back, or was refused), which starts its cooldown.
    "0006_champion_moves",
    """
    CREATE TABLE champion_moves(
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        action       TEXT NOT NULL CHECK(action IN ('promote','rollback')),
        from_version TEXT,
        to_version   TEXT,
        basis        TEXT UNIQUE,
        reason       TEXT NOT NULL,
        at           TEXT NOT NULL
    );
    CREATE TABLE champion_watch(
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        champion TEXT NOT NULL,
        outcome  TEXT NOT NULL CHECK(outcome IN ('rolled_back','refused')),
        reason   TEXT NOT NULL,
        at       TEXT NOT NULL
    );
    """,
))



MIGRATIONS.append((
    # #20, proof in production. tasks: the version that served (academyd.attribution), the status moving
    # forward (status_rank; done_seq numbers tasks in the order they finished, which is the order the
    # anytime-valid watch reads them in), and what the answer showed (guardrails). feedback: thumbs from
    # Venom's feedback.jsonl, joined to tasks by task_id. approved_pairs: hidden_prompts.jsonl, a curation
    # source. watch_decisions: the watch's end state per promotion (confirmed or rolled_back).
    "0020_production_signals",
    """
    ALTER TABLE tasks ADD COLUMN served_version TEXT;
    ALTER TABLE tasks ADD COLUMN status_rank INTEGER NOT NULL DEFAULT 2;
    ALTER TABLE tasks ADD COLUMN done_seq INTEGER;
    ALTER TABLE tasks ADD COLUMN empty INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN leak INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN updated_at TEXT;
    UPDATE tasks SET served_version = model_version, done_seq = seq, updated_at = received_at;
    CREATE INDEX tasks_served ON tasks(served_version, done_seq);
    CREATE INDEX tasks_done ON tasks(done_seq);
    CREATE TABLE feedback(
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id      TEXT NOT NULL UNIQUE REFERENCES inbox(event_id),
        task_id       TEXT NOT NULL,
        rating        TEXT NOT NULL CHECK(rating IN ('up','down')),
        comment       TEXT,
        intent        TEXT,
        timestamp     TEXT,
        received_at   TEXT NOT NULL
    );
    CREATE INDEX feedback_task ON feedback(task_id, seq);
    CREATE TABLE approved_pairs(
        seq               INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id          TEXT NOT NULL UNIQUE REFERENCES inbox(event_id),
        task_id           TEXT,
        prompt            TEXT NOT NULL,
        approved_response TEXT NOT NULL,
        intent            TEXT,
        prompt_hash       TEXT,
        note              TEXT,
        timestamp         TEXT,
        received_at       TEXT NOT NULL
    );
    CREATE TABLE watch_decisions(
        champion    TEXT NOT NULL,
        promoted_at TEXT NOT NULL,
        parent      TEXT NOT NULL,
        state       TEXT NOT NULL CHECK(state IN ('confirmed','rolled_back')),
        cause       TEXT NOT NULL,
        at_task     INTEGER NOT NULL,
        reason      TEXT NOT NULL,
        stats       TEXT NOT NULL,
        decided_at  TEXT NOT NULL,
        PRIMARY KEY (champion, promoted_at)
    );
    """,
))


MIGRATIONS.append((
    # #20: the watch's latest assessment of each champion it looked at (while watching too), for /metrics
    # and `academy.status` without recomputing the statistics at every scrape.
    "0021_watch_latest",
    """
    CREATE TABLE watch_latest(
        champion    TEXT PRIMARY KEY,
        promoted_at TEXT NOT NULL,
        parent      TEXT NOT NULL,
        state       TEXT NOT NULL,
        reason      TEXT NOT NULL,
        stats       TEXT NOT NULL,
        at          TEXT NOT NULL
    );
    """,
))

def migrate(store: Connection) -> list[str]:
    """Apply the migrations not yet applied; return their names."""
    conn = store.conn
    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    done = {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
    applied = []
    for name, sql in MIGRATIONS:
        if name in done:
            continue
        with store.transaction():
            for statement in _split_sql(sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations(name, applied_at) VALUES (?, ?)", (name, iso(utcnow())))
        applied.append(name)
    return applied


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (no semicolons inside our literals)."""
    out, buf = [], []
    for line in script.splitlines():
        stripped = line.strip()
        if stripped.startswith("--"):
            continue
        buf.append(line)
        if stripped.endswith(";"):
            out.append("\n".join(buf))
            buf = []
    if "".join(buf).strip():
        out.append("\n".join(buf))
    return [s for s in out if s.strip()]
