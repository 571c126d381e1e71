"""Restatements of a lesson from a model: any OpenAI-compatible chat endpoint (curator.paraphraser).

The templates (academyd.curator.augment) restate what their patterns read; a model restates anything, in
words no template has. For each training lesson the paraphraser is asked, one request each:

- `questions_per_lesson` times to restate the lesson's question in other words, in its language
  (seed = the variant's number); each accepted one is asked with the lesson's own answer;
- `answers_per_lesson` times to restate the answer keeping its facts; each accepted one answers the
  lesson's own question (several answer forms). Only lessons whose answer names something checkable
  (academyd.arena.answers.answer_keys) get these: there is no other way to tell a kept fact from a lost one.

What comes back is checked before it is used (`check`): a non-empty single line, 8 to `max_chars`
characters and at most about twice the input's length (what a small model adds to a fact is made up), no
chat markup, in the lesson's language, not the input again nor the input quoted inside more words, its
words real English or Polish words (wordfreq; the lesson's own names aside: a small model writes made-up
Polish around the fact), repeating no phrase and borrowing no word of the worked example in the prompt; a
question must be one (a question mark, or a request: "Tell me", "Podaj"), an answer keep every key of the
lesson's answer; both keep at least half of their input's content words (by lemma or stem, as the gate
compares) and every name and number. Before those checks, the curator's secret scanner: a reply with
anything secret-looking in it is dropped (the lessons sent were scanned, so the model made it up). A
small model's restatements are poor and most are rejected; that is what the checks are for, and the
manifest counts each reason.

Answers are cached on disk (`<data_dir>/cache/paraphraser/`), one file per request, keyed by the sha256
of the request (model, messages with the lesson's question and answer in them, sampling parameters) and
the lesson's question and answer: a second build asks nothing it asked before. The raw reply is cached,
not the verdict, so a changed check applies to cached replies too. Failures are not cached.

A failing paraphraser never fails curation: transient errors (connection, timeout, 408/429/5xx) are
retried (tenacity, `max_tries`); a request that still fails, or a reply that is not a chat completion,
stops the paraphraser for the rest of the build (the templates still apply, cached replies are still
used) and the manifest says it failed and why. The API key is read from the environment variable
`api_key_env` names, sent as a Bearer token, and never logged, cached or written.

Synchronous: the curator runs in a worker thread (the daemon) or the CLI's main thread; the requests run
on a private event loop (aiohttp), in a thread of their own when the caller's thread already runs one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity import wait_exponential_jitter

from academyd.arena.answers import STOPWORDS, answer_keys, is_right, normalize_answer, tokens
from academyd.curator.augment import Restatement, language
from academyd.files import atomic_write_bytes
from academyd.settings import ParaphraserSettings

log = structlog.get_logger("academyd.curator.paraphrase")

TEMPLATE_Q = "paraphraser:question"
TEMPLATE_A = "paraphraser:answer"
_LANG_NAME = {"pl": "Polish", "en": "English"}
_LABEL = re.compile(r"^\s*(?:(?:rewritten|restated|new|other|paraphrased)\s+)?(?:question|answer|paraphrase|"
                    r"pytanie|odpowiedź|variant \d+)\s*(?:\(\w+\))?\s*:\s*", re.I)
_NUMBERING = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+")
_NUMBERISH = re.compile(r"[\d_/\\.:#@\-+=]")
_PREAMBLE = re.compile(r"^\s*(?:sure|certainly|of course|here(?:'s| is| are)|oto)\b.*:\s*$", re.I)


@dataclass(frozen=True)
class Lesson:
    """A training lesson to restate: its family (kept by every restatement), question and answer."""

    family: str
    question: str
    answer: str
    answer_key: Any = None  # metadata.answer_key, when the lesson names its own


@dataclass
class Stats:
    """What the paraphraser did in one build (the manifest's `augmentation.paraphraser`)."""

    url: str
    model: str
    planned: int = 0
    requested: int = 0
    cached: int = 0
    skipped_budget: int = 0
    skipped_failed: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        replies = self.accepted + sum(self.rejected.values())
        return {"url": self.url, "model": self.model, "planned": self.planned, "requested": self.requested,
                "cached": self.cached, "skipped_budget": self.skipped_budget, "skipped_failed": self.skipped_failed,
                "replies": replies, "accepted": self.accepted, "rejected": dict(sorted(self.rejected.items())),
                "accepted_fraction": round(self.accepted / replies, 3) if replies else None,
                "failed": self.error is not None, "error": self.error, "seconds": round(self.seconds, 2)}


class ParaphraserFailed(Exception):
    """The endpoint cannot be used for the rest of this build (the message says why)."""


class _Transient(Exception):
    """Worth another try: a connection error, a timeout, 408/429/5xx."""


@dataclass(frozen=True)
class _Request:
    lesson: int
    kind: str  # "question" | "answer"
    body: dict[str, Any]
    key: str  # the cache key


def chat_url(url: str) -> str:
    """The chat completions URL of an OpenAI base URL (…/v1), or the URL itself when it is one."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


# One worked example per kind and language, as earlier chat turns: a small model copies the shape of an
# example far better than it follows a description.
_EXAMPLES = {
    ("question", "en"): ("What is the capital of France?", "Which city is France's capital?"),
    ("question", "pl"): ("Jaka jest stolica Francji?", "Które miasto jest stolicą Francji?"),
    ("answer", "en"): ("What is the capital of France?\nAnswer: The capital of France is Paris.",
                       "Paris is the capital of France."),
    ("answer", "pl"): ("Jaka jest stolica Francji?\nOdpowiedź: Stolicą Francji jest Paryż.",
                       "Paryż jest stolicą Francji."),
}


_EXAMPLE_WORDS = frozenset(t for pair in _EXAMPLES.values() for text in pair for t in tokens(text)
                           if len(t) >= 4 and t not in STOPWORDS)


def _messages(kind: str, lesson: Lesson, lang: str, variant: int) -> list[dict[str, str]]:
    lang = lang if lang in _LANG_NAME else "en"
    name = _LANG_NAME[lang]
    if kind == "question":
        system = (f"You rewrite questions in other words, in {name}. Reply with the rewritten question only: "
                  "no answer, no explanation. Keep every name and number.")
        ask, text = ("Przepisz innymi słowami: " if lang == "pl" else "Rewrite in other words: "), lesson.question
    else:
        system = (f"You say answers again in other words, in {name}, as one short sentence. Keep every fact, "
                  "name and number; add nothing.")
        ask = "Powiedz odpowiedź innymi słowami. Pytanie: " if lang == "pl" else \
            "Say the answer in other words. Question: "
        text = f"{lesson.question}\n{'Odpowiedź' if lang == 'pl' else 'Answer'}: {lesson.answer}"
    example_in, example_out = _EXAMPLES[(kind, lang)]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": ask + example_in},
                {"role": "assistant", "content": example_out}, {"role": "user", "content": ask + text}]
    if variant:  # another variant: another request (and seed), the same instruction
        messages[-1]["content"] += f" (variant {variant + 1})"
    return messages


def plan(lessons: Sequence[Lesson], cfg: ParaphraserSettings) -> tuple[list[_Request], list[list[str]]]:
    """The requests for `lessons` (in order) and each lesson's answer keys."""
    requests: list[_Request] = []
    keys: list[list[str]] = []
    for i, les in enumerate(lessons):
        lang = language(les.question)
        k = answer_keys(les.question, [les.answer], explicit=les.answer_key)
        keys.append(k)
        variants = [("question", v) for v in range(cfg.questions_per_lesson)]
        if k:
            variants += [("answer", v) for v in range(cfg.answers_per_lesson)]
        for kind, v in variants:
            body = {"model": cfg.model, "messages": _messages(kind, les, lang, v), "temperature": cfg.temperature,
                    "max_tokens": cfg.max_tokens, "seed": v, "stream": False}
            blob = json.dumps([body, les.question, les.answer], ensure_ascii=False, sort_keys=True)
            requests.append(_Request(i, kind, body, hashlib.sha256(blob.encode()).hexdigest()))
    return requests, keys


def clean(reply: str) -> str:
    """The restatement in a reply: its first line that is not a preamble, without a label, numbering or
    quotes around it."""
    for line in reply.replace("\r", "\n").split("\n"):
        line = line.strip()
        if not line or _PREAMBLE.match(line):
            continue
        line = _NUMBERING.sub("", _LABEL.sub("", line)).strip()
        if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`„”“":
            line = line[1:-1].strip()
        line = line.strip("\"'`„”“*").strip()
        if line:
            return line
    return ""


def check(kind: str, text: str, lesson: Lesson, keys: Sequence[str], max_chars: int) -> str | None:
    """Why a restatement is rejected (None: accepted). `text` is the cleaned reply."""
    if not text:
        return "empty"
    if len(text) < 8:
        return "too_short"
    if len(text) > max_chars:
        return "too_long"
    if "<|" in text or "|>" in text or "```" in text:
        return "markup"
    original = lesson.question if kind == "question" else lesson.answer
    if len(text) > max(2 * len(original), len(original) + 40):
        return "too_long"  # what a small model adds to a fact is made up
    said, given = normalize_answer(text), normalize_answer(original)
    if said == given:
        return "same_as_input"
    if given in said:
        return "quotes_input"  # 'A variant of the question "...": ...'
    lang = language(lesson.question)
    if language(text) != lang:
        return "other_language"
    if not _words_known(text, lesson):
        return "unknown_words"
    toks = tokens(text)
    if len(set(zip(toks, toks[1:], toks[2:]))) < len(toks) - 2:
        return "repetitive"  # "X is a Y is a Y is a Y"
    if _EXAMPLE_WORDS & (set(toks) - set(tokens(lesson.question)) - set(tokens(lesson.answer))):
        return "copied_example"
    if kind == "question":
        first = toks[:1]
        if not (text.endswith("?") or (first and first[0] in _ASKING)):
            return "not_a_question"
        if normalize_answer(text) == normalize_answer(lesson.answer):
            return "answer_not_question"
    elif not keys or not all(is_right(text, [k]) for k in keys):
        return "lost_fact"
    topic = _content_words(original)  # the input's own words, at least half of them (by lemma or stem)
    if topic and not is_right(text, topic):
        return "lost_topic"
    if not all(is_right(text, [w]) for w in _names(original)):
        return "lost_name"  # "Venus's nightly backup" for "Venom's": every name and number kept
    return None


def _names(text: str) -> list[str]:
    """Names and numbers: words written with a capital inside a sentence, a digit or a symbol."""
    raw = text.split()
    out = []
    for i, word in enumerate(raw):
        folded = tokens(word)
        if not folded:
            continue
        w = folded[0]
        w = w[:-2] if w.endswith(("'s", "’s")) else w
        starts = i == 0 or raw[i - 1][-1:] in ".?!:"
        if (word.strip("\"'(„“")[:1].isupper() and not starts) or _NUMBERISH.search(w):
            out.append(w)
    return out


def _content_words(text: str) -> list[str]:
    words = {t[:-2] if t.endswith(("'s", "’s")) else t for t in tokens(text)}
    return sorted(w for w in words if w not in STOPWORDS and (len(w) >= 3 or any(c.isdigit() for c in w)))


# First words of a request that is not written as a question ("Tell me ...", "Podaj ...").
_ASKING = frozenset("tell remind give name say state list please explain podaj powiedz przypomnij wymień napisz "
                    "wskaż proszę".split())
KNOWN_WORDS = 0.85


def _words_known(text: str, lesson: Lesson) -> bool:
    """At least KNOWN_WORDS of the text's words are words (of English or Polish, by wordfreq), not counting
    the lesson's own: a small model writes made-up Polish that keeps the fact."""
    from wordfreq import zipf_frequency

    own = set(tokens(lesson.question)) | set(tokens(lesson.answer))
    own |= {w for t in own for w in re.findall(r"[^\W\d_]+", t)}
    rest = [w for w in re.findall(r"[^\W\d_]+", text.casefold()) if w not in own]
    if not rest:
        return True
    known = sum(max(zipf_frequency(w, "en"), zipf_frequency(w, "pl")) > 0 for w in rest)
    return known >= KNOWN_WORDS * len(rest)


class _Cache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
            content = data["content"]
            return content if isinstance(content, str) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, model: str, content: str) -> None:
        blob = json.dumps({"key": key, "model": model, "content": content, "at": time.time()}, ensure_ascii=False)
        atomic_write_bytes(self._path(key), blob.encode(), mode=0o600)


def _content(body: Any) -> str:
    """The assistant message of an OpenAI chat completion; ParaphraserFailed when the reply is not one."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ParaphraserFailed(f"the reply is not an OpenAI chat completion: {str(body)[:160]!r}") from None
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ParaphraserFailed(f"the reply's message content is not text: {str(content)[:160]!r}")
    return content


async def _ask_all(todo: list[_Request], cfg: ParaphraserSettings, api_key: str | None, cache: _Cache,
                   got: dict[str, str], stats: Stats, progress: Callable[[int, int], None]) -> None:
    url = chat_url(cfg.url or "")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)

    def said(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("paraphraser_retry", url=url, attempt=state.attempt_number, error=_safe(str(exc), api_key))

    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:

        async def once(req: _Request) -> str:
            try:
                async with session.post(url, json=req.body) as resp:
                    text = await resp.text(errors="replace")
                    if resp.status in (408, 429) or resp.status >= 500:
                        raise _Transient(f"HTTP {resp.status}: {text[:160]}")
                    if resp.status != 200:
                        raise ParaphraserFailed(f"HTTP {resp.status}: {text[:200]}")
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as exc:
                raise _Transient(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc
            try:
                body = json.loads(text)
            except ValueError:
                raise ParaphraserFailed(f"the reply is not JSON: {text[:160]!r}") from None
            return _content(body)

        for n, req in enumerate(todo):
            progress(n, len(todo))
            try:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(_Transient), stop=stop_after_attempt(cfg.max_tries),
                    wait=wait_exponential_jitter(multiplier=0.5, max=8.0, jitter=0.5), reraise=True, before_sleep=said,
                ):
                    with attempt:
                        stats.requested += 1
                        content = await once(req)
            except (_Transient, ParaphraserFailed) as exc:
                stats.error = _safe(str(exc), api_key)
                stats.skipped_failed = len(todo) - n
                log.warning("paraphraser_failed", url=url, model=cfg.model, error=stats.error,
                            skipped=stats.skipped_failed)
                return
            got[req.key] = content
            cache.put(req.key, cfg.model, content)
        progress(len(todo), len(todo))


def _safe(text: str, secret: str | None) -> str:
    return text.replace(secret, "[api key]") if secret else text


def _run(coro: Any) -> Any:
    """Run `coro` to the end on a loop of its own (in a thread when this one already runs a loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1, thread_name_prefix="paraphraser") as pool:
        return pool.submit(asyncio.run, coro).result()


def paraphrase(lessons: Sequence[Lesson], cfg: ParaphraserSettings, cache_dir: Path, *,
               progress: Callable[[int, int], None] | None = None) -> tuple[list[list[Restatement]], dict[str, Any]]:
    """Restatements of each lesson (aligned with `lessons`) from the configured model, checked and
    secret-scanned, and what happened (for the manifest). Never raises for the endpoint's faults."""
    from academyd.secrets import scanner as secret_scanner

    t0 = time.monotonic()
    stats = Stats(url=cfg.url or "", model=cfg.model)
    out: list[list[Restatement]] = [[] for _ in lessons]
    if not cfg.url or not lessons:
        return out, stats.as_dict()
    requests, keys = plan(lessons, cfg)
    stats.planned = len(requests)
    cache = _Cache(cache_dir)
    got: dict[str, str] = {}
    todo: list[_Request] = []
    for req in requests:
        hit = cache.get(req.key)
        if hit is not None:
            got[req.key] = hit
            stats.cached += 1
        elif len(todo) < cfg.max_requests:
            todo.append(req)
        else:
            stats.skipped_budget += 1
    api_key: str | None = None
    if todo and cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env) or None
        if api_key is None:
            stats.error = f"the environment variable {cfg.api_key_env} (curator.paraphraser.api_key_env) is not set"
            stats.skipped_failed = len(todo)
            log.warning("paraphraser_failed", model=cfg.model, error=stats.error)
            todo = []
    if todo:
        _run(_ask_all(todo, cfg, api_key, cache, got, stats, progress or (lambda done, total: None)))

    # Every reply we have (fresh or cached): scanned for secrets, then checked.
    replies = [(req, clean(got[req.key])) for req in requests if req.key in got]
    scanned = secret_scanner().clean_many([text for _, text in replies]) if replies else []
    seen: list[set[tuple[str, str]]] = [{(normalize_answer(les.question), normalize_answer(les.answer))}
                                        for les in lessons]
    for (req, text), (_, secret_types, _) in zip(replies, scanned, strict=True):
        les = lessons[req.lesson]
        why = "secret" if secret_types else check(req.kind, text, les, keys[req.lesson], cfg.max_chars)
        if why is None:
            pair = (normalize_answer(text), normalize_answer(les.answer)) if req.kind == "question" else \
                (normalize_answer(les.question), normalize_answer(text))
            if pair in seen[req.lesson]:
                why = "duplicate"
            else:
                seen[req.lesson].add(pair)
        if why is not None:
            stats.rejected[why] += 1
            continue
        prompt, answer = (text, les.answer) if req.kind == "question" else (les.question, text)
        out[req.lesson].append(Restatement(prompt, answer, les.family, "question", language(text),
                                           TEMPLATE_Q if req.kind == "question" else TEMPLATE_A))
        stats.accepted += 1
    stats.seconds = time.monotonic() - t0
    log.info("paraphrased", **{k: v for k, v in stats.as_dict().items() if k != "rejected"})
    return out, stats.as_dict()
