"""`academyd models list|show|promote|rollback` against a real daemon (promote and rollback go through it)."""

from __future__ import annotations

from typing import Any

import pytest

from fixtures.web import register_version

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@pytest.fixture
async def daemon(make_settings, start_daemon) -> Any:
    return await start_daemon(make_settings())


async def test_models_list_show_promote_rollback(daemon, cli, tmp_path) -> None:
    app = daemon.app
    data = ["--data-dir", str(app.settings.data_dir)]
    url = ["--nats-url", app.nats_url]

    r = await cli("models", "list", *data, "--json")
    assert r.code == EXIT_OK, r.err
    assert r.json() == []
    r = await cli("models", "list", *data)
    assert "no model versions yet" in r.out

    register_version(app, "run-a", heldout_loss=1.9)
    r = await cli("models", "promote", "v1", *url, "--reason", "cli test", "--json")
    assert r.code == EXIT_OK, (r.out, r.err)
    assert r.json()["version"] == "v1"
    assert app.pipeline.status()["champion"] == "v1"

    r = await cli("models", "promote", "v1", *url)
    assert r.code == EXIT_FAILED and "already the champion" in r.out
    r = await cli("models", "promote", "v99", *url)
    assert r.code == EXIT_FAILED and "no version v99" in r.out
    r = await cli("models", "promote", "latest", *url)
    assert r.code == EXIT_USAGE and "not a version name" in r.err

    register_version(app, "run-b", heldout_loss=1.5)  # a child of the champion v1
    r = await cli("models", "promote", "v2", *url)
    assert r.code == EXIT_OK and "promoted v2" in r.out

    r = await cli("models", "list", *data)
    assert r.code == EXIT_OK
    lines = r.out.splitlines()
    v1 = next(i for i, line in enumerate(lines) if " v1 " in f" {line} ")
    v2 = next(i for i, line in enumerate(lines) if " v2 " in f" {line} ")
    assert v2 > v1 and "★ champion" in lines[v2] and "retired" in lines[v1]
    r = await cli("models", "show", "champion", *data, "--json")
    assert r.code == EXIT_OK
    assert (r.json()["version"], r.json()["parent"], r.json()["status"]) == ("v2", "v1", "champion")
    r = await cli("models", "show", "v2", *data)
    assert r.code == EXIT_OK and "cli test" not in r.out and "promoted" in r.out

    r = await cli("models", "rollback", *url, "--reason", "regressed", "--json")
    assert r.code == EXIT_OK, (r.out, r.err)
    assert app.pipeline.status()["champion"] == "v1"
    r = await cli("models", "rollback", *url)
    assert r.code == EXIT_OK and "rolled back to the base model" in r.out
    r = await cli("models", "rollback", *url)
    assert r.code == EXIT_FAILED and "base model" in r.out

    r = await cli("models", "show", "v42", *data)
    assert r.code == EXIT_USAGE and "models list" in r.err
    r = await cli("models", "list", "--data-dir", str(tmp_path / "empty"))
    assert r.code == EXIT_USAGE and "academyd run" in r.err
