"""Restatements of a lesson from templates (academyd.curator.augment): Polish and English, several answer
forms, the fact as a statement and backwards, each carrying its lesson's family; the same every time."""

from __future__ import annotations

from collections import Counter

import pytest

from academyd.curator.augment import (
    KINDS,
    Restatement,
    answer_entity,
    augment,
    language,
    parse_question,
    restate,
    translate_topic,
)

PL_Q, PL_A = "Jaki jest port serwera Borsuk?", "Port serwera Borsuk to 8080."
EN_Q, EN_A = "What is the port of server Borsuk?", "The port of server Borsuk is 8080."


def by_kind(out: list[Restatement]) -> dict[str, list[Restatement]]:
    kinds: dict[str, list[Restatement]] = {k: [] for k in KINDS}
    for r in out:
        kinds[r.kind].append(r)
    return kinds


def test_a_polish_lesson_restated() -> None:
    out = restate(PL_Q, PL_A, family="fam-port", seed=1)
    kinds = by_kind(out)
    assert {r.family for r in out} == {"fam-port"}
    pl_questions = [r for r in kinds["question"] if r.lang == "pl"]
    en_questions = [r for r in kinds["question"] if r.lang == "en"]
    assert len(pl_questions) == 4 and len(en_questions) == 4
    assert all("port serwera Borsuk" in r.prompt or "Port serwera Borsuk" in r.prompt for r in pl_questions)
    # In English the topic is translated (every word is in the glossary, Borsuk is a name).
    assert all("the port of server Borsuk" in r.prompt.replace("The port", "the port") for r in en_questions)
    # Several answer forms, each with the fact in it.
    answers = {r.answer for r in kinds["question"]}
    assert len(answers) >= 3 and all("8080" in a for a in answers)
    assert {r.answer for r in en_questions} <= {"The port of server Borsuk is 8080.", "8080."}
    assert [r.answer for r in kinds["statement"]] == ["Port serwera Borsuk to 8080."] * 2
    assert [(r.prompt, r.answer) for r in kinds["cloze"]] == [("Dokończ zdanie: Port serwera Borsuk to …", "8080")]
    assert ("Czym jest 8080?", "8080 to port serwera Borsuk.") in [(r.prompt, r.answer) for r in kinds["reverse"]]
    assert (PL_Q, PL_A) not in [(r.prompt, r.answer) for r in out]  # the lesson itself is not repeated
    assert len({(r.prompt, r.answer) for r in out}) == len(out)


def test_an_english_lesson_restated() -> None:
    out = restate(EN_Q, EN_A, family="fam-en", seed=0, per_kind=8)
    kinds = by_kind(out)
    prompts = {r.prompt for r in kinds["question"]}
    # all eight frames but the lesson's own wording (the direct frame is the question itself)
    assert "Do you know what the port of server Borsuk is?" in prompts
    assert "The port of server Borsuk: what is it?" in prompts
    assert len(prompts - {EN_Q}) == 7 and all(r.lang == "en" for r in out)
    assert {r.answer for r in kinds["question"]} == {EN_A, "8080."}
    assert ("What is 8080?", "8080 is the port of server Borsuk.") in [(r.prompt, r.answer) for r in kinds["reverse"]]
    assert ("Complete the sentence: The port of server Borsuk is ...", "8080") in [
        (r.prompt, r.answer) for r in kinds["cloze"]]


def test_a_person_is_asked_for_backwards_with_who() -> None:
    out = restate("Who is the release manager of Venom?", "Zofia Wrona", family="f")
    reverse = [(r.prompt, r.answer) for r in out if r.kind == "reverse"]
    assert ("Who is Zofia Wrona?", "Zofia Wrona is the release manager of Venom.") in reverse


def test_times_keep_their_preposition_and_are_not_reversed() -> None:
    out = restate("Kiedy jest nocna kopia zapasowa?", "Nocna kopia zapasowa jest o 03:15.", family="f", per_kind=8)
    assert not [r for r in out if r.kind == "reverse"]
    assert {r.answer for r in out if r.kind == "statement"} == {"Nocna kopia zapasowa jest o 03:15."}
    english = [r for r in out if r.lang == "en"]
    assert english and all("the nightly backup" in r.prompt.lower() for r in english)
    assert {r.answer for r in english} == {"The nightly backup is at 03:15.", "At 03:15."}


def test_an_untranslatable_topic_is_asked_in_english_frames_as_people_mix() -> None:
    out = restate("Jaka jest ścieżka sejfu Venoma?", "/srv/venom/skarbiec", family="f")
    mixed = [r for r in out if r.lang == "pl+en"]
    assert mixed and all("ścieżka sejfu venoma" in r.prompt.lower() for r in mixed)
    assert all(r.answer.rstrip(".") == "/srv/venom/skarbiec" for r in mixed)


def test_what_no_template_reads_gets_frames_of_the_whole_question_only() -> None:
    out = restate("Fix the flaky test in CI", "Retry the network call with backoff.", family="f")
    assert out and {r.kind for r in out} == {"question"}
    assert all("fix the flaky test in CI." in r.prompt.replace("Fix", "fix") for r in out)
    assert {r.answer for r in out} == {"Retry the network call with backoff."}
    # A long answer has no short entity: no reverse pair, no cloze, no bare-entity answer.
    out = restate("What is the deploy procedure?", "First drain the node, then roll the pods one by one, and "
                  "finally run the smoke tests against staging.", family="f")
    assert {r.kind for r in out} == {"question"}


def test_deterministic_and_seeded() -> None:
    a = restate(EN_Q, EN_A, family="f", seed=7)
    assert a == restate(EN_Q, EN_A, family="f", seed=7)
    assert [r.key for r in a] == [r.key for r in restate(EN_Q, EN_A, family="f", seed=7)]
    seeds = {tuple(r.template for r in restate(EN_Q, EN_A, family="f", seed=s)) for s in range(6)}
    assert len(seeds) > 1  # the seed picks among the frames


def test_every_restatement_carries_its_lessons_family() -> None:
    lessons = [(f"fam-{i}", q, a) for i, (q, a) in enumerate([
        (PL_Q, PL_A), (EN_Q, EN_A), ("Jak nazywa się serwer testowy?", "Serwer testowy nazywa się jastrzab."),
        ("Who is the release manager of Venom?", "Zofia Wrona"), ("Fix the flaky test", "Retry it."),
    ])]
    out = augment(lessons, seed=3)
    counts = Counter(r.family for r in out)
    assert set(counts) == {f for f, _, _ in lessons} and all(n >= 3 for n in counts.values())
    entity = {"fam-0": "8080", "fam-1": "8080", "fam-2": "jastrzab", "fam-3": "Wrona", "fam-4": "Retry"}
    for r in out:  # each restatement says its own lesson's fact, never another's
        assert entity[r.family].lower() in (r.prompt + r.answer).lower(), r
        others = [e for f, e in entity.items() if f != r.family and e not in ("8080",)]
        assert not any(e.lower() in (r.prompt + r.answer).lower() for e in others), r


@pytest.mark.parametrize(("text", "lang"), [
    (PL_Q, "pl"), (EN_Q, "en"), ("Gdzie jest plik konfiguracyjny?", "pl"), ("Co to jest borsuk", "pl"),
    ("Where is the config file?", "en"), ("Is the staging server up?", "en"),
])
def test_language(text: str, lang: str) -> None:
    assert language(text) == lang


@pytest.mark.parametrize(("text", "wh", "copula", "topic"), [
    (PL_Q, "jaki", "jest", "port serwera Borsuk"),
    ("Hej, jak nazywa się serwer testowy?", "jak", "nazywa się", "serwer testowy"),
    ("Co to jest skarbiec?", "co", "to jest", "skarbiec"),
    ("What's the name of the GPU host?", "what", "is", "the name of the GPU host"),
    ("Quick question: who is our release manager?", "who", "is", "our release manager"),
    ("Tell me the port of the Academy page.", "what", "is", "the port of the Academy page"),
    ("Which port does the Academy use?", None, None, None),
    ("Restart the service", None, None, None),
])
def test_parse_question(text: str, wh: str | None, copula: str | None, topic: str | None) -> None:
    q = parse_question(text)
    assert (None if q is None else (q.wh, q.copula, q.topic)) == (None if wh is None else (wh, copula, topic))


@pytest.mark.parametrize(("answer", "lang", "entity"), [
    ("8080", "en", "8080"), ("Zofia Wrona.", "en", "Zofia Wrona"), (EN_A, "en", "8080"),
    ("The staging server is called borsuk.", "en", "borsuk"), ("The Academy page listens on port 8765.", "en", "8765"),
    (PL_A, "pl", "8080"), ("Serwer testowy nazywa się jastrzab.", "pl", "jastrzab"),
    ("It depends on the load and on what else runs there at the time.", "en", None),
])
def test_answer_entity(answer: str, lang: str, entity: str | None) -> None:
    assert answer_entity(answer, lang) == entity


@pytest.mark.parametrize(("topic", "english"), [
    ("port serwera Borsuk", "the port of server Borsuk"),
    ("nazwa hosta GPU", "the name of host GPU"),
    ("nocna kopia zapasowa", "the nightly backup"),
    ("adres serwera testowego", "the address of the test server"),
    ("ścieżka sejfu Venoma", None),
])
def test_translate_topic(topic: str, english: str | None) -> None:
    assert translate_topic(topic) == english
