"""Restatements from a paraphraser (academyd.curator.paraphrase): the real SmolLM2 in the project's llama.cpp
endpoint restates training lessons; its replies are checked, cached by content hash (a second build asks
nothing: the endpoint's own request counter says so), kept in their lesson's family and decontaminated
like the templates' (every held-out family grepped for in the training file). An endpoint that is down or
answers garbage never fails a build: the templates still apply and the manifest says why. A reply with a
secret in it is dropped; the API key is sent, never written."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from academyd.curator.build import build_dataset
from academyd.curator.dedup import jaccard, normalize, shingle_set
from academyd.curator.paraphrase import Lesson, check, clean, paraphrase
from academyd.settings import ParaphraserSettings, SettingsError, load_settings
from academyd.store import Store
from fixtures.curator import SECRETS, T0, CorpusStore
from fixtures.house import FACTS as EN_FACTS
from fixtures.house import PHRASINGS
from fixtures.polish import FACTS as PL_FACTS
from fixtures.trainer import REPO, trainer_env

PL = Lesson("f1", "Jaki port ma panel admina?", "Panel admina działa na porcie 7443.")
EN = Lesson("f2", "What is the name of Venom's staging server?", "The staging server is called borsuk.")


# ------------------------------------------------------------------ the checks (no model)

def test_replies_are_cleaned_and_checked() -> None:
    assert clean('Sure! Here is the rewritten question:\n1. "What is our staging server called?"') == \
        "What is our staging server called?"
    assert clean("Rewritten question: Which port does the admin panel use?\nIt is 7443.") == \
        "Which port does the admin panel use?"
    keys = ["borsuk"]
    assert check("question", "What is Venom's staging server called?", EN, keys, 300) is None
    assert check("question", "what is the NAME of venom's staging server", EN, keys, 300) == "same_as_input"
    assert check("question", "How is the weather today?", EN, keys, 300) == "lost_topic"
    assert check("question", "Jak się nazywa serwer testowy Venoma?", EN, keys, 300) == "other_language"
    assert check("question", "What " * 80 + "server?", EN, keys, 300) == "too_long"
    assert check("question", 'A variant of "What is the name of Venom\'s staging server?"', EN, keys, 300) == \
        "quotes_input"
    assert check("question", "The staging server of Venom is called Stanley.", EN, keys, 300) == "not_a_question"
    assert check("question", "Tell me the name of Venom's staging server.", EN, keys, 300) is None
    assert check("question", "What is the name of Venus's staging server?", EN, keys, 300) == "lost_name"
    assert check("question", "Na jakim wiek, w jestki współczujak panel admina?", PL, keys, 300) == "unknown_words"
    assert check("question", "Który port obsługuje panel admina?", PL, keys, 300) is None
    assert check("answer", "The staging server of Venom, in its tactical systems, is known to be called borsuk.",
                 EN, keys, 300) == "too_long"
    assert check("question", "<|im_start|>assistant staging server", EN, keys, 300) == "markup"
    assert check("question", "", EN, keys, 300) == "empty"
    assert check("answer", "Our staging machine is named borsuk.", EN, keys, 300) is None
    assert check("answer", "The staging server is called kestrel.", EN, keys, 300) == "lost_fact"
    assert check("answer", "Port panelu admina to 7443.", PL, ["7443"], 300) is None
    assert check("answer", "Port panelu admina to 8080.", PL, ["7443"], 300) == "lost_fact"


def test_a_url_with_credentials_or_a_bad_key_name_is_refused() -> None:
    with pytest.raises(SettingsError, match="must not carry credentials"):
        load_settings(None, curator={"paraphraser": {"url": "http://user:pw@127.0.0.1:9/v1"}})
    with pytest.raises(SettingsError, match="api_key_env"):
        load_settings(None, curator={"paraphraser": {"url": "http://127.0.0.1:9/v1", "api_key_env": "sk-123 x"}})
    assert load_settings(None).curator.paraphraser.url is None  # off by default


# ------------------------------------------------------------------ corpus, endpoint, helpers

def _lessons(store: Store) -> dict[str, tuple[str, str]]:
    """4 Polish facts x 6 questions and 4 English house facts x 6 phrasings, one answer each (48 lessons)."""
    c = CorpusStore(store)
    out = {}
    for f in PL_FACTS[:4]:
        for q in f["questions"]:
            answer = f["answer"][0].upper() + f["answer"][1:] + "."
            out[c.lesson(q, answer, "Sukces ✅")] = (q, answer)
    for f in EN_FACTS[:4]:
        for p in PHRASINGS[:6]:
            q = p.format(topic=f["topic"])
            out[c.lesson(q, f["answer"], "Sukces ✅")] = (q, f["answer"])
    return out


def _settings(tmp_path: Path, url: str | None, **para: Any) -> Any:
    paraphraser = {"url": url, "model": "base", "questions_per_lesson": 1, "answers_per_lesson": 1,
                   "max_tokens": 40, "timeout_s": 120, **para}
    return load_settings(None, data_dir=tmp_path / "data",
                         curator={"augment": True, "min_examples": 10, "paraphraser": paraphraser})


def _rows(path: str) -> list[tuple[str, str]]:
    return [(r["input"], r["output"]) for r in map(json.loads, Path(path).read_text(encoding="utf-8").splitlines())]


def _assert_no_heldout_in_training(result: Any, threshold: float) -> None:
    """Every held-out family's questions grepped for in the training file: none there, nothing near."""
    train_text = Path(result.path).read_text(encoding="utf-8").casefold()
    train_q = [q for q, _ in _rows(result.path)]
    held_q = {q for q, _ in _rows(result.heldout_path)}
    assert held_q
    for h in held_q:
        assert json.dumps(h, ensure_ascii=False)[1:-1].casefold() not in train_text, h
        sh = shingle_set(normalize(h), 5)
        assert max(jaccard(sh, shingle_set(normalize(t), 5)) for t in train_q) < threshold, h


@pytest.fixture
def endpoint(llama_python: Path, smollm2_gguf: Path) -> Iterator[str]:
    """The project's llama.cpp endpoint on the real SmolLM2, started as a user would start it."""
    env = trainer_env({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    proc = subprocess.Popen([str(llama_python), "-m", "academyd.follower.endpoint", "--base", str(smollm2_gguf),
                             "--port", "0", "--threads", "1", "--ctx", "1024"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        yield ready["url"]
    finally:
        proc.terminate()
        proc.wait(30)


async def _requests_served(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/health") as r:
        return int((await r.json())["stats"]["requests"])


# ------------------------------------------------------------------ the real model

@pytest.mark.slow
@pytest.mark.timeout(1500)
async def test_smollm2_restates_lessons_once_and_never_a_held_out_one(tmp_path: Path, endpoint: str) -> None:
    templates_only = _settings(tmp_path, None)
    store = Store.open(templates_only.db_path)
    _lessons(store)
    base = await asyncio.to_thread(build_dataset, templates_only, store, now=T0)
    assert base.ok, base.refused

    settings = _settings(tmp_path, endpoint + "/v1")
    before = await _requests_served(endpoint)
    # as the daemon runs curation: in a worker thread, while this loop serves on
    first = await asyncio.to_thread(build_dataset, settings, store, now=T0.replace(hour=13))
    served = await _requests_served(endpoint) - before
    assert first.ok, first.refused
    aug = json.loads(Path(first.manifest_path).read_text())["augmentation"]
    stats = aug["paraphraser"]
    print("paraphraser, first build:", json.dumps(stats), "kept after decontamination:", aug["from_paraphraser"])
    assert not stats["failed"], stats
    assert stats["planned"] > 40 and stats["requested"] == stats["planned"] == served and stats["cached"] == 0
    assert stats["replies"] == stats["planned"] and stats["accepted"] >= 1, stats
    # the paraphrases are the lines a templates-only build of the same split does not have
    new = set(_rows(first.path)) - set(_rows(base.path))
    assert len(new) == aug["from_paraphraser"] >= 1
    assert set(_rows(first.heldout_path)) == set(_rows(base.heldout_path))
    _assert_no_heldout_in_training(first, settings.curator.decontamination_threshold)

    # a second build asks nothing: every reply comes from the cache, the dataset is the same
    again = await asyncio.to_thread(build_dataset, settings, store, now=T0.replace(hour=14))
    assert await _requests_served(endpoint) - before == served
    stats2 = json.loads(Path(again.manifest_path).read_text())["augmentation"]["paraphraser"]
    assert stats2["requested"] == 0 and stats2["cached"] == stats["planned"], stats2
    assert again.content_hash == first.content_hash
    assert len(list((settings.data_dir / "cache" / "paraphraser").rglob("*.json"))) == stats["planned"]
    store.close()


# ------------------------------------------------------------------ endpoints that fail

class StandIn:
    """An OpenAI-shaped endpoint that answers what a test tells it to (garbage, a secret), recording requests."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.auth: list[str | None] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.auth.append(request.headers.get("Authorization"))
        body = await request.json()
        return self.reply(body) if callable(self.reply) else web.Response(text=self.reply, content_type="text/html")

    async def __aenter__(self) -> StandIn:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _templates_and_why(result: Any) -> tuple[dict[str, Any], int]:
    aug = json.loads(Path(result.manifest_path).read_text())["augmentation"]
    return aug, aug["restatements"]


def _templates_only(tmp_path: Path) -> int:
    """How many restatements the templates alone make of the same lessons (no paraphraser)."""
    settings = _settings(tmp_path, None)
    store = Store.open(settings.db_path)
    _lessons(store)
    r = build_dataset(settings, store, now=T0)
    store.close()
    return _templates_and_why(r)[1]


async def test_an_endpoint_that_is_down_leaves_the_templates(tmp_path: Path) -> None:
    settings = _settings(tmp_path, f"http://127.0.0.1:{_closed_port()}/v1", max_tries=2)
    store = Store.open(settings.db_path)
    _lessons(store)
    r = await asyncio.to_thread(build_dataset, settings, store, now=T0)
    assert r.ok, r.refused
    aug, restated = _templates_and_why(r)
    stats = aug["paraphraser"]
    assert stats["failed"] and "Connect" in stats["error"], stats  # aiohttp's ClientConnectorError, said
    assert stats["requested"] == 2 and stats["skipped_failed"] == stats["planned"]  # retried once, then stopped
    # the templates' restatements are all there
    assert restated == _templates_only(tmp_path / "templates") > 0 and aug["from_paraphraser"] == 0
    _assert_no_heldout_in_training(r, settings.curator.decontamination_threshold)
    store.close()


async def test_an_endpoint_that_answers_garbage_leaves_the_templates_and_never_sees_the_key_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    key = "sk-test-" + os.urandom(8).hex()
    monkeypatch.setenv("ACADEMY_TEST_PARAPHRASER_KEY", key)
    async with StandIn("<html><body>502 Bad Gateway (but 200)</body></html>") as standin:
        settings = _settings(tmp_path, standin.url, api_key_env="ACADEMY_TEST_PARAPHRASER_KEY")
        store = Store.open(settings.db_path)
        _lessons(store)
        r = await asyncio.to_thread(build_dataset, settings, store, now=T0)
    assert r.ok, r.refused
    aug, restated = _templates_and_why(r)
    stats = aug["paraphraser"]
    assert stats["failed"] and "not JSON" in stats["error"] and stats["requested"] == 1, stats
    assert restated == _templates_only(tmp_path / "templates") > 0 and aug["from_paraphraser"] == 0
    assert standin.auth == [f"Bearer {key}"]  # the key was sent ...
    written = "".join(p.read_text(errors="replace") for p in settings.data_dir.rglob("*") if p.is_file()
                      and p.suffix in (".json", ".jsonl"))
    assert key not in written and key not in capsys.readouterr().out  # ... and is nowhere on disk or in the log
    assert "ACADEMY_TEST_PARAPHRASER_KEY" in written  # only its name, in the settings the manifest records
    store.close()


async def test_a_restatement_with_a_secret_is_dropped_and_good_ones_join_their_family(tmp_path: Path) -> None:
    questions: set[str] = set()

    def reply(body: dict[str, Any]) -> web.Response:
        user = body["messages"][-1]["content"]
        if "\n" in user:  # an answer form ("...: QUESTION\nAnswer: ANSWER"): the fact, one word less, or a secret
            answer = user.split("\n", 1)[1].split(": ", 1)[1]
            text = f"Borsuk, token {SECRETS['github']}." if "borsuk" in answer.lower() else \
                "So, " + answer.split(" ", 1)[1]
        else:  # a question ("Rewrite in other words: QUESTION"): one word less
            question = user.split(": ", 1)[1]
            text = "Rewritten question: So, " + question.split(" ", 1)[1]
            questions.add(text.split(": ", 1)[1])
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": text}}]})

    async with StandIn(reply) as standin:
        settings = _settings(tmp_path, standin.url)
        store = Store.open(settings.db_path)
        lessons = _lessons(store)
        r = await asyncio.to_thread(build_dataset, settings, store, now=T0)
    assert r.ok, r.refused
    aug = json.loads(Path(r.manifest_path).read_text())["augmentation"]
    stats = aug["paraphraser"]
    assert not stats["failed"] and stats["rejected"].get("secret", 0) >= 1, stats
    text = Path(r.path).read_text(encoding="utf-8")
    assert SECRETS["github"] not in text and "token" not in text
    rows = _rows(r.path)
    asked = {q for q, _ in lessons.values()}
    # a restated question is asked with its lesson's own answer (the same family), an answer form answers
    # its lesson's own question
    restated = [(q, a) for q, a in rows if q in questions]
    strays = [(q, a) for q, a in restated if not any(q[4:] == o.split(" ", 1)[1] and a == oa
                                                     for o, oa in lessons.values())]
    assert restated and not strays, strays
    forms = [(q, a) for q, a in rows if a.startswith("So, ")]
    assert forms and all(q in asked and any(oq == q and oa.endswith(a[4:]) for oq, oa in lessons.values())
                         for q, a in forms), forms
    _assert_no_heldout_in_training(r, settings.curator.decontamination_threshold)
    store.close()


def test_paraphrase_runs_inside_a_running_loop(tmp_path: Path) -> None:
    """Called from a thread that already runs an event loop (a coroutine calling the curator directly), the
    requests run on a loop of their own instead of failing."""
    async def inside() -> dict[str, Any]:
        _, stats = paraphrase([EN], ParaphraserSettings(url=f"http://127.0.0.1:{_closed_port()}/v1", max_tries=1),
                              tmp_path / "cache")
        return stats

    stats = asyncio.run(inside())
    assert stats["failed"] and stats["requested"] == 1, stats
