"""Code-switched restatements from FreeDict's dictionaries (Debian's dict-freedict-eng-pol / -pol-eng, which
scripts/install-system-deps installs): the real files, read as the curator reads them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from academyd.curator import lexicon
from academyd.curator.build import build_dataset
from academyd.settings import load_settings
from academyd.store import Store
from fixtures.curator import T0, CorpusStore
from fixtures.polish import polish_lessons


@pytest.fixture(scope="module")
def dictionaries() -> tuple[lexicon.Lexicon, lexicon.Lexicon]:
    en_pl, pl_en = lexicon.load("en", "pl"), lexicon.load("pl", "en")
    if en_pl is None or pl_en is None:
        pytest.fail(f"FreeDict's eng-pol / pol-eng dictionaries are missing from {lexicon.DEFAULT_DIR}: "
                    "`make test` installs them (scripts/install-system-deps)", pytrace=False)
    return en_pl, pl_en


def test_words_are_looked_up_by_lemma_first_sense_first(dictionaries: tuple[lexicon.Lexicon, ...]) -> None:
    en_pl, pl_en = dictionaries
    assert en_pl.translations("machines")[0] == "maszyna"  # plural -> lemma -> first sense
    assert en_pl.translations("meeting") == ["spotkanie", "zebranie"]
    assert en_pl.translations("office")[0] == "biuro"
    assert pl_en.translations("serwerowni") == ["server room"]  # locative -> serwerownia
    assert pl_en.translations("katalogu")[0] == "directory"
    # the Polish definitions after each English sense are not translations
    assert all(" " not in t or len(t.split()) <= 2 for t in pl_en.translations("kanał"))
    assert "przedmiot" not in " ".join(pl_en.translations("kopia"))
    assert en_pl.translations("zzzqx") == [] and pl_en.translations("Kestrel") == []


def test_switch_translates_content_words_and_keeps_names_entities_and_function_words(
        dictionaries: tuple[lexicon.Lexicon, ...]) -> None:
    en_pl, pl_en = dictionaries
    q = "Which meeting room does the Kestrel team use in the office?"
    full = lexicon.switch(q, en_pl, random.Random(0), rate=1.0, keep=frozenset({"kestrel"}))
    assert full is not None
    assert "spotkanie" in full and "pomieszczenie" in full and "biuro" in full, full
    assert "Kestrel" in full and full.startswith("Which") and " the " in full, full  # name, function words
    # rate 1 is the first sense of every word, whatever the seed; lower rates vary with the seed
    assert lexicon.switch(q, en_pl, random.Random(7), rate=1.0, keep=frozenset({"kestrel"})) == full
    halves = {lexicon.switch(q, en_pl, random.Random(s), rate=0.5) for s in range(12)}
    assert len(halves) > 3
    pl = lexicon.switch("Jaki jest kod do drzwi serwerowni?", pl_en, random.Random(0), rate=1.0)
    assert pl is not None and "server room" in pl and "code" in pl, pl
    assert lexicon.switch("What is it?", en_pl, random.Random(0), rate=1.0) is None  # nothing to translate


def test_the_curator_adds_code_switched_questions_in_each_lessons_family(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "data", curator={"augment": True, "code_switch": 2})
    store = Store.open(settings.db_path)
    c = CorpusStore(store)
    lessons = polish_lessons()
    for les in lessons:
        c.lesson(les["situation"], les["action"], les["result"], lesson_id=les["id"])
    r = build_dataset(settings, store, now=T0)
    assert r.ok, r.refused
    manifest = json.loads(Path(r.manifest_path).read_text())
    switched = manifest["augmentation"]["code_switched"]
    assert switched["per_lesson"] == 2 and switched["made"] >= manifest["augmentation"]["lessons"], switched
    assert 0 < switched["kept"] <= switched["made"]
    rows = [json.loads(x) for x in Path(r.path).read_text(encoding="utf-8").splitlines()]
    lesson_questions = {les["situation"] for les in lessons}
    # the Polish lessons asked with English words: some training question mixes the two
    english_words = {"code", "server", "meeting", "name", "port", "backup", "file", "directory"}
    mixed = [x["input"] for x in rows if x["input"] not in lesson_questions
             and english_words & set(x["input"].lower().replace("?", " ").split())]
    assert mixed, "no code-switched question in the training file"
    store.close()

    # without the dictionaries: no code-switched rows, and the manifest says why
    empty = load_settings(None, data_dir=tmp_path / "data2", curator={"augment": True, "code_switch": 2,
                                                                       "lexicon_dir": str(tmp_path / "none")})
    store = Store.open(empty.db_path)
    c = CorpusStore(store)
    for les in lessons:
        c.lesson(les["situation"], les["action"], les["result"], lesson_id=les["id"])
    r2 = build_dataset(empty, store, now=T0)
    store.close()
    missing = json.loads(Path(r2.manifest_path).read_text())["augmentation"]["code_switched"]
    assert missing["made"] == 0 and "no FreeDict" in missing["missing"], missing
