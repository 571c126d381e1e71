"""Every `academyd` subcommand as a user runs it (a subprocess) against a real daemon on a real nats-server:
tables for people, `--json` for scripts, exit codes (0 ok, 1 failed/refused, 2 bad input, 3 no daemon)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from academyd.embedded import free_port
from fixtures.nats import lesson, publish, wait_for

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


@pytest.fixture
async def daemon(make_settings, start_daemon) -> Any:
    return await start_daemon(make_settings(http={"enabled": True, "port": 0}))


def url_of(daemon: Any) -> list[str]:
    return ["--nats-url", daemon.app.nats_url]


async def test_status_table_and_json(daemon, nc, cli) -> None:
    js = nc.jetstream()
    for i in range(3):
        await publish(js, "lesson.created", lesson(i), f"ev-lesson-{i}")
    await publish(js, "lesson.created", lesson(9, success=False), "ev-lesson-9")
    await wait_for(lambda: daemon.app.store.counts()["lesson.created"] == 4)

    r = await cli("status", *url_of(daemon), "--json")
    assert r.code == EXIT_OK, r.err
    s = r.json()
    assert s["counts"]["lesson.created"] == 4
    assert s["threshold"]["new_successful_lessons"] == 3
    assert s["page_url"] == daemon.app.web.url

    r = await cli("status", *url_of(daemon))
    assert r.code == EXIT_OK, r.err
    assert "3 / 100" in r.out and "15%" not in r.out and "3%" in r.out
    assert "wait" in r.out and "3/100 new successful lessons" in r.out
    assert daemon.app.web.url in r.out


async def test_no_daemon_and_bad_settings_say_what_to_do(cli, tmp_path) -> None:
    r = await cli("status", "--nats-url", f"nats://127.0.0.1:{free_port()}")
    assert r.code == EXIT_UNREACHABLE
    assert "academyd run" in r.err and "--nats-url" in r.err
    assert "Traceback" not in r.err

    r = await cli("train", "--follow", "--nats-url", f"nats://127.0.0.1:{free_port()}")
    assert r.code == EXIT_UNREACHABLE and "academyd run" in r.err

    r = await cli("status", env={"ACADEMY_POLICY__MIN_LESSONS": "0"})
    assert r.code == EXIT_USAGE
    assert "ACADEMY_POLICY__MIN_LESSONS" in r.err

    r = await cli("status", "--config", str(tmp_path / "missing.toml"))
    assert r.code == EXIT_USAGE and "does not exist" in r.err

    r = await cli("train", "--frobnicate")
    assert r.code == EXIT_USAGE and "unrecognized arguments" in r.err
    r = await cli()
    assert r.code == EXIT_USAGE and "COMMAND" in r.err


async def test_train_refused_forced_and_one_at_a_time(daemon, cli) -> None:
    r = await cli("train", *url_of(daemon), "--json")
    assert r.code == EXIT_FAILED
    assert r.json() == {"ok": False, "started": False, "reason": "0/100 new successful lessons", "active_run": None}

    r = await cli("train", *url_of(daemon), "--force", "--reason", "cli test", "--json")
    assert r.code == EXIT_OK, r.err
    started = r.json()
    assert started["started"] is True
    run = daemon.app.store.get_run(started["run_id"])
    assert run["forced"] == 1 and "cli test" in run["reason"]

    r = await cli("train", *url_of(daemon), "--force")
    assert r.code == EXIT_FAILED
    assert r.out.startswith("not started") and started["run_id"] in r.out


async def worker(nc: Any, *, fail: bool = False, steps: int = 3) -> asyncio.Task[None]:
    """A training worker as fast as can be: the whole run is on the bus right after the request."""
    js = nc.jetstream()
    requested: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_request(msg: Any) -> None:
        await requested.put(json.loads(msg.data))

    await nc.subscribe("academy.training.requested", cb=on_request)
    await nc.flush()

    async def run() -> None:
        req = await requested.get()
        run_id = req["run_id"]
        base = {"schema_version": 1, "at": "2026-11-25T12:00:00+00:00", "run_id": run_id}
        await publish(js, "academy.training.started", {**base, "event_id": f"{run_id}-s", "habitat": "remote"})
        for step in range(1, steps + 1):
            await publish(js, "academy.training.progress", {**base, "event_id": f"{run_id}-{step}", "step": step,
                                                            "total_steps": steps, "loss": 3.0 / step,
                                                            "tokens_per_s": 1000.0})
        if fail:
            await publish(js, "academy.training.failed", {**base, "event_id": f"{run_id}-f", "reason": "loss_nan"})
        else:
            await publish(js, "academy.training.finished", {**base, "event_id": f"{run_id}-d", "version": "v7",
                                                            "final_loss": 1.0, "duration_s": 0.2})

    return asyncio.create_task(run())


async def test_train_follow_sees_a_run_that_ends_before_it_subscribes(daemon, nc, cli) -> None:
    task = await worker(nc)
    r = await cli("train", *url_of(daemon), "--force", "--follow", "--json", timeout=30)
    await task
    assert r.code == EXIT_OK, (r.out, r.err)
    lines = [json.loads(line) for line in r.out.splitlines()]
    assert lines[0]["started"] is True
    run_id = lines[0]["run_id"]
    events = [(e["subject"], e.get("step")) for e in lines[1:]]
    assert events == [
        ("academy.training.requested", None), ("academy.training.started", None),
        ("academy.training.progress", 1), ("academy.training.progress", 2), ("academy.training.progress", 3),
        ("academy.training.finished", None),
    ]
    assert all(e["run_id"] == run_id for e in lines[1:])


async def test_train_follow_reports_a_failed_run(daemon, nc, cli) -> None:
    task = await worker(nc, fail=True)
    r = await cli("train", *url_of(daemon), "--force", "--follow", timeout=30)
    await task
    assert r.code == EXIT_FAILED, (r.out, r.err)
    assert "started run-" in r.out
    assert "failed run-" in r.out and "loss_nan" in r.out


async def test_dataset_build_and_backfill(daemon, nc, cli, tmp_path) -> None:
    js = nc.jetstream()
    for i in range(24):
        await publish(js, "lesson.created", lesson(i), f"ev-lesson-{i}")
    await wait_for(lambda: daemon.app.store.counts()["lesson.created"] == 24)
    data = ["--data-dir", str(daemon.app.settings.data_dir)]
    env = {"ACADEMY_CURATOR__MIN_EXAMPLES": "5"}

    r = await cli("dataset", "build", *data, "--json", env=env)
    assert r.code == EXIT_OK, r.err
    built = r.json()
    assert built["refused"] is None and built["examples"] > 0 and built["heldout"] > 0
    # every lesson once (trained, held out or dropped); the training file adds the default's restatements
    kept = sum(c["train"] + c["heldout"] for c in built["counts"].values())
    assert kept + sum(built["dropped"].values()) == 24 and built["examples"] > kept - built["heldout"]
    assert Path(built["path"]).is_file() and Path(built["manifest_path"]).is_file()

    r = await cli("dataset", "build", *data, env=env)
    assert r.code == EXIT_OK, r.err
    assert "lesson" in r.out and "content hash" in r.out

    r = await cli("dataset", "build", *data, "--json", env={"ACADEMY_CURATOR__MIN_EXAMPLES": "500"})
    assert r.code == EXIT_FAILED
    assert r.json()["refused"] and "curator.min_examples" in r.err

    r = await cli("dataset", "build", *data, "--format", "csv")
    assert r.code == EXIT_USAGE and "invalid choice" in r.err

    # backfill-git: an allowlisted repository's history becomes commits; anything else is refused.
    repo = tmp_path / "demo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=T", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    for i in range(3):
        (repo / f"f{i}.py").write_text(f"print({i})\n")
        subprocess.run([*git, "add", "."], check=True)
        subprocess.run([*git, "commit", "-qm", f"Add module number {i} with a print"], check=True)
    env_repos = {"ACADEMY_REPOS": json.dumps({"demo": str(repo)})}
    r = await cli("dataset", "backfill-git", "demo", *data, "--json", env=env_repos)
    assert r.code == EXIT_OK, r.err
    assert r.json()["commits"] == 3
    r = await cli("dataset", "backfill-git", "other", *data, env=env_repos)
    assert r.code == EXIT_USAGE and "allowlist" in r.err.lower()


async def test_import_venom_publishes_once(daemon, cli, tmp_path) -> None:
    mem = tmp_path / "venom" / "data" / "memory"
    mem.mkdir(parents=True)
    lessons = [{"lesson_id": f"l{i}", "timestamp": "2026-11-20T10:00:00", "situation": f"Build {i} broke",
                "action": "Pinned the dependency", "result": "Sukces ✅", "feedback": "pin early", "tags": [],
                "metadata": {}} for i in range(4)]
    (mem / "lessons.json").write_text(json.dumps({"lessons": lessons, "count": 4, "last_updated": "x"}))
    (mem / "state_dump.json").write_text(json.dumps({"tasks": []}))

    r = await cli("import-venom", str(tmp_path / "venom"), *url_of(daemon), "--json")
    assert r.code == EXIT_OK, r.err
    assert r.json()["published"] == 4 and r.json()["lessons"] == 4
    await wait_for(lambda: daemon.app.store.counts()["lesson.created"] == 4)

    r = await cli("import-venom", str(tmp_path / "venom"), *url_of(daemon))
    assert r.code == EXIT_OK, r.err
    assert "4 already on the bus" in r.out

    r = await cli("import-venom", str(tmp_path / "nowhere"), *url_of(daemon))
    assert r.code == EXIT_USAGE and "academyd:" in r.err


async def test_schemas_export(cli, tmp_path) -> None:
    r = await cli("schemas", "export", "--out", str(tmp_path / "s"), "--json")
    assert r.code == EXIT_OK, r.err
    files = [Path(f) for f in r.json()["files"]]
    names = {f.name for f in files}
    assert {"lesson.created.json", "academy.training.progress.json", "model.promoted.json"} <= names, names
    for f in files:
        assert json.loads(f.read_text())["type"] == "object"
    r = await cli("schemas", "export", "--out", str(tmp_path / "t"))
    assert r.code == EXIT_OK and len(r.out.splitlines()) == len(files)


async def test_run_once_with_the_embedded_server(cli, tmp_path) -> None:
    data = tmp_path / "once"
    r = await cli("run", "--once", "--port", "0", "--data-dir", str(data),
                  env={"ACADEMY_HTTP__ENABLED": "false", "ACADEMY_LOG_LEVEL": "warning"}, timeout=60)
    assert r.code == EXIT_OK, r.err
    assert (data / "academy.db").is_file() and (data / "nats").is_dir()

    r = await cli("run", "--once", "--data-dir", str(data), "--config", str(tmp_path / "nope.toml"))
    assert r.code == EXIT_USAGE and "does not exist" in r.err

    # The page's port is taken: one line that says which setting to change, no traceback.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = await cli("run", "--once", "--port", "0", "--data-dir", str(data),
                      env={"ACADEMY_HTTP__PORT": str(port), "ACADEMY_LOG_LEVEL": "warning"}, timeout=60)
    assert r.code == EXIT_FAILED, (r.out, r.err)
    assert "ACADEMY_HTTP__PORT" in r.err and "Traceback" not in r.err


async def test_a_fresh_directory_just_works_with_the_generated_credentials(cli, tmp_path) -> None:
    """`academyd run` then `academyd status` / `models list` / `train` in a fresh directory, default data dir,
    the embedded server: the CLI finds the operator's credentials the daemon generated at its first start."""
    from fixtures.nats import daemon_cmd, daemon_env

    env = {"ACADEMY_NATS__EMBEDDED_PORT": str(free_port()), "ACADEMY_HTTP__ENABLED": "false",
           "ACADEMY_LOG_LEVEL": "warning"}
    r = await cli("status", env=env, cwd=tmp_path)
    assert r.code == EXIT_UNREACHABLE and "academyd run" in r.err and "Traceback" not in r.err

    daemon = subprocess.Popen(daemon_cmd("run"), cwd=tmp_path, env=daemon_env(**env),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            r = await cli("status", "--json", env=env, cwd=tmp_path)
            if r.code == EXIT_OK:
                break
            await asyncio.sleep(0.3)
        assert r.code == EXIT_OK, r.err
        assert r.json()["counts"]["lesson.created"] == 0
        r = await cli("models", "list", "--json", env=env, cwd=tmp_path)
        assert r.code == EXIT_OK, r.err
        r = await cli("train", "--json", env=env, cwd=tmp_path)
        assert r.code in (EXIT_OK, EXIT_FAILED) and r.json()["ok"] is False, (r.out, r.err)  # refused: no lessons
        # The credentials are the data directory's, readable by its owner only.
        users = tmp_path / "data" / "nats" / "users"
        names = {p.name for p in users.iterdir()}
        assert {"academyd.password", "operator.password", "agent.password", "follower.password"} <= names, names
        assert all(n.endswith(".password") for n in names), names
        assert all((p.stat().st_mode & 0o077) == 0 for p in users.iterdir())
    finally:
        daemon.terminate()
        daemon.wait(30)
