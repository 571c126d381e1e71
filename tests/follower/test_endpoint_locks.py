"""The llama.cpp endpoint's admin API is locked (#19): the real endpoint process on the real SmolLM2, started
by the `llamacpp` target as a user's follower starts it. Without the token an admin call gets 401, a
`text/plain` (or form) body 415, whatever it says; the follower itself, with the token it generated into
the data directory, loads and activates an adapter. An endpoint started without any token has its admin
API closed."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fixtures.follower import make_version
from fixtures.trainer import REPO, trainer_env

from academyd.follower.targets import LlamaCppTarget
from academyd.settings import Settings

pytestmark = pytest.mark.slow


async def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def test_admin_calls_need_the_token_and_a_json_body(tmp_path: Path, llama_python: Path, smollm2_gguf: Path,
                                                         base_identity: dict[str, str]) -> None:
    settings = Settings(data_dir=tmp_path / "data", follower={
        "target": "llamacpp", "base_gguf": smollm2_gguf, "runtime_python": llama_python, "port": 0, "threads": 1})
    target = LlamaCppTarget(settings)
    token_file = settings.follower_dir / "endpoint.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    token = token_file.read_text().strip()
    payload = make_version(settings.data_dir, "v1", smollm2_gguf, base_identity, "x", seed=1)
    try:
        await target.start()
        url = f"{target.url}/admin/activate"
        body = json.dumps({"id": None}).encode()
        json_ct = {"Content-Type": "application/json"}
        assert (await _post(url, body, json_ct))[0] == 401  # no token
        assert (await _post(url, body, {**json_ct, "Authorization": "Bearer wrong"}))[0] == 401
        status, answer = await _post(url, body, {"Content-Type": "text/plain", "Authorization": f"Bearer {token}"})
        assert status == 415 and answer["error"]["code"] == "unsupported_media_type", answer
        form = {"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Bearer {token}"}
        assert (await _post(f"{target.url}/admin/adapters", b"id=v1", form))[0] == 415
        # A browser's simple request (text/plain, no token) is refused before its body is read.
        assert (await _post(url, body, {"Content-Type": "text/plain"}))[0] == 401
        # The follower, with the token from the data directory, swaps.
        await target.stage("v1", {"gguf_path": payload["gguf_path"], "adapter_path": payload["adapter_path"]})
        await target.switch("v1", None)
        assert await target.serving() == "v1"
    finally:
        await target.close()

    # Started by hand without a token: the admin API is closed, the chat still answers.
    env = trainer_env({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    env.pop("ACADEMY_ENDPOINT_TOKEN", None)
    proc = subprocess.Popen([str(llama_python), "-m", "academyd.follower.endpoint", "--base", str(smollm2_gguf),
                             "--port", "0", "--threads", "1", "--ctx", "512"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        status, answer = await _post(f"{ready['url']}/admin/activate", body,
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        assert status == 401 and "closed" in answer["error"]["message"], answer
    finally:
        proc.terminate()
        proc.wait(20)
