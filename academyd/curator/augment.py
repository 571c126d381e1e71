"""Restatements of a lesson from templates: one fact, asked and answered in several forms. Pure, no model.

A fact seen in one wording is learnt as that wording; seen restated in several forms it becomes knowledge
a model can answer in other words (Physics of Language Models 3.1, arXiv 2309.14316), and a fact is only
answered backwards if it was trained backwards (the reversal curse, arXiv 2309.12288). So for a lesson's
question and answer, `restate()` writes:

- question: interrogative variants of the question in other frames, word orders and registers
  ("Could you tell me what the port of server X is?", "Przypomnij mi, jaki jest port serwera X."),
  each answered in one of several answer forms (the lesson's answer, the short entity, "X is Y");
- statement: what the lesson teaches said as a fact ("The port of server X is 8080." /
  "Port serwera X to 8080."), asked for with an open prompt;
- cloze: the fact's stem to complete ("Complete: The port of server X is" -> "8080");
- reverse: the fact asked from the answer's side when the answer is a short entity ("What is 8080?" ->
  "8080 is the port of server X.");
- the other language: a Polish question is also asked in English frames, with its topic translated where
  every word is in a small glossary (`GLOSSARY`), else kept in Polish as people mix languages.

Templates only: a question none of the patterns reads (`parse_question` is None) gets frame variants of
the whole question and nothing else; an answer with no short entity gets no reverse pair and no short form.
Every restatement carries the family key of its source lesson, so the held-out split keeps a lesson's
restatements on the lesson's side. Deterministic: the same inputs and seed give the same list.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

KINDS = ("question", "statement", "cloze", "reverse")
MAX_ENTITY_WORDS = 5

_PL_CHARS = set("ąćęłńóśźżĄĆĘŁŃÓŚŹŻ")
_PL_WORDS = {"jaki", "jaka", "jakie", "jakiego", "jak", "co", "gdzie", "kiedy", "który", "która", "które", "czy",
             "jest", "się", "to", "nazywa", "serwera", "na", "w", "o", "ile", "kto", "podaj", "powiedz"}


@dataclass(frozen=True)
class Restatement:
    """One restated example: ask `prompt`, answer `answer`. `family` is the source lesson's."""

    prompt: str
    answer: str
    family: str
    kind: str  # one of KINDS
    lang: str  # "en", "pl", or "pl+en" (an English frame around a Polish topic)
    template: str  # which template wrote it (for counting and debugging)

    @property
    def key(self) -> str:
        """A stable id: the family and the text."""
        return hashlib.sha256(f"{self.family}\0{self.prompt}\0{self.answer}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Question:
    """A question read by a template: `wh` `copula` `topic` ("what" "is" "the port of server X")."""

    lang: str
    wh: str  # the interrogative word as written, lower case ("what", "jaki", "jak")
    copula: str  # "is"/"are" ("jest" in Polish; "nazywa się" for "jak nazywa się X")
    topic: str  # the noun phrase asked about, as written (case kept)


def language(text: str) -> str:
    """"pl" when the text has Polish letters or Polish function words, else "en"."""
    if any(c in _PL_CHARS for c in text):
        return "pl"
    words = re.findall(r"[a-ząćęłńóśźż]+", text.lower())
    hits = sum(w in _PL_WORDS for w in words)
    return "pl" if words and hits >= max(1, len(words) // 4) else "en"


def _strip(text: str) -> str:
    return text.strip().rstrip("?.!").strip()


_EN_LEAD = r"(?:(?:hey|hi|so|ok|okay|quick question)[,:!]?\s+)?(?:(?:please|pls)\s+)?"
_EN_PATTERNS = [
    re.compile(_EN_LEAD + r"(?P<wh>what|who|where|when|which)(?:'s|\s+(?P<cop>is|are|was))\s+(?P<topic>.+)", re.I),
    re.compile(_EN_LEAD + r"(?:tell me|remind me of|do you know|could you tell me|can you tell me)\s+"
               r"(?P<topic>the\s.+|our\s.+|venom's\s.+)", re.I),
]
_PL_PATTERNS = [
    re.compile(r"(?:(?:hej|cześć|szybkie pytanie)[,:!]?\s+)?(?P<wh>jaki|jaka|jakie|który|która|które|kto|gdzie|kiedy)"
               r"\s+(?P<cop>jest|są)\s+(?P<topic>.+)", re.I),
    re.compile(r"(?:(?:hej|cześć)[,:!]?\s+)?(?P<wh>jak)\s+(?P<cop>nazywa się|nazywają się)\s+(?P<topic>.+)", re.I),
    re.compile(r"(?:(?:hej|cześć)[,:!]?\s+)?(?P<wh>co)\s+(?P<cop>to jest|jest)\s+(?P<topic>.+)", re.I),
]


def parse_question(text: str) -> Question | None:
    """The question's wh-word, copula and topic, when a pattern reads it; None otherwise."""
    q = _strip(" ".join(text.split()))
    lang = language(q)
    if lang == "pl":
        for pat in _PL_PATTERNS:
            m = pat.fullmatch(q)
            if m:
                return Question("pl", m["wh"].lower(), m["cop"].lower(), _strip(m["topic"]))
        return None
    for pat in _EN_PATTERNS:
        m = pat.fullmatch(q)
        if m:
            wh = (m.groupdict().get("wh") or "what").lower()
            cop = (m.groupdict().get("cop") or "is").lower()
            topic = _strip(m["topic"])
            if wh == "which":  # "which port does X use": the words are not a noun phrase
                return None
            return Question("en", wh, cop, topic)
    return None


_EN_TAILS = [r"\bis called\s+", r"\bare called\s+", r"\bis named\s+", r"\bon port\s+", r"\blives at\s+",
             r"\bruns at\s+", r"\bis\s+", r"\bare\s+", r"\bwas\s+"]
_PL_TAILS = [r"\bnazywa się\s+", r"\bna porcie\s+", r"\bo godzinie\s+", r"\bto\s+", r"\bjest\s+", r"\bwynosi\s+"]


def answer_entity(answer: str, lang: str) -> str | None:
    """The short entity an answer gives (a name, a number, a path): the whole answer when it is short,
    else what follows its copula ("The port is 8080." -> "8080"); None when there is no short one."""
    text = " ".join(answer.split()).strip()
    bare = text.rstrip(".!")
    if 0 < len(bare.split()) <= 3 and not re.search(r"\b(is|are|jest|to)\b", bare, re.I):
        return bare
    for tail in _PL_TAILS if lang == "pl" else _EN_TAILS:
        matches = list(re.finditer(tail, bare, re.I))
        if matches:
            entity = bare[matches[-1].end():].strip()
            if entity and len(entity.split()) <= MAX_ENTITY_WORDS:
                return entity
    return None


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


def _low(text: str) -> str:
    """Lower-case the first letter unless the first word looks like a name (two capitals, a digit)."""
    first = text.split(" ", 1)[0]
    if len(first) > 1 and (first[1:].lower() != first[1:] or any(c.isdigit() for c in first)):
        return text
    return text[:1].lower() + text[1:]


# Polish nouns common in house facts -> English; a genitive becomes "of ...". A topic is translated only
# when every word is here or is a name (capitalised, with a digit or a symbol); else it stays Polish.
GLOSSARY: dict[str, tuple[str, bool]] = {  # word: (english, is_genitive)
    "port": ("port", False), "portu": ("port", True), "serwer": ("server", False), "serwera": ("server", True),
    "nazwa": ("name", False), "nazwy": ("name", True), "adres": ("address", False), "adresu": ("address", True),
    "ścieżka": ("path", False), "ścieżki": ("path", True), "katalog": ("directory", False),
    "katalogu": ("directory", True), "plik": ("file", False), "pliku": ("file", True),
    "godzina": ("time", False), "godziny": ("time", True), "dzień": ("day", False), "dnia": ("day", True),
    "kanał": ("channel", False), "kanału": ("channel", True), "host": ("host", False), "hosta": ("host", True),
    "usługa": ("service", False), "usługi": ("service", True), "projekt": ("project", False),
    "projektu": ("project", True), "wersja": ("version", False), "wersji": ("version", True),
    "numer": ("number", False), "numeru": ("number", True), "baza": ("database", False),
    "bazy": ("database", True), "kopia": ("backup", False), "kopii": ("backup", True),
    "zapasowa": ("", False), "zapasowej": ("", True), "danych": ("", True), "agent": ("agent", False),
    "agenta": ("agent", True), "menedżer": ("manager", False), "menedżera": ("manager", True),
    "klucz": ("key", False), "klucza": ("key", True), "repozytorium": ("repository", False),
    "gałąź": ("branch", False), "gałęzi": ("branch", True), "domyślny": ("default", False),
    "domyślna": ("default", False), "domyślnej": ("default", True), "domyślnego": ("default", True),
    "głównego": ("main", True), "główny": ("main", False), "główna": ("main", False),
    "nocnej": ("nightly", True), "nocna": ("nightly", False), "testowego": ("test", True),
    "testowy": ("test", False), "produkcyjnego": ("production", True), "produkcyjny": ("production", False),
}
_ADJECTIVES = {"domyślny", "domyślna", "domyślnej", "domyślnego", "głównego", "główny", "główna", "nocnej",
               "nocna", "testowego", "testowy", "produkcyjnego", "produkcyjny", "zapasowa", "zapasowej"}


def _is_name(word: str) -> bool:
    return word[:1].isupper() or any(not c.isalpha() for c in word)


def translate_topic(topic: str) -> str | None:
    """A Polish noun phrase of glossary words and names in English ("port serwera X" -> "the port of
    server X"); None when a word is not in the glossary."""
    words = topic.split()
    if not words:
        return None
    groups: list[list[str]] = []  # [head nominative group], then one group per genitive noun with its names
    pending_adj: list[str] = []
    for i, word in enumerate(words):
        low = word.lower()
        if i > 0 and _is_name(word):
            if not groups:
                return None
            groups[-1].append(word)
            continue
        if low not in GLOSSARY:
            return None
        english, _genitive = GLOSSARY[low]
        if low in _ADJECTIVES:
            if english:
                # Polish puts most adjectives after the noun ("serwera testowego"): attach to the last noun.
                if groups and i > 0 and words[i - 1].lower() not in _ADJECTIVES:
                    groups[-1].insert(len(groups[-1]) - 1, english)
                else:
                    pending_adj.append(english)
            continue
        if not english:
            continue
        groups.append([*pending_adj, english])
        pending_adj = []
    if not groups:
        return None
    phrase = "the " + " ".join(groups[0])
    for group in groups[1:]:
        phrase += " of " + ("the " if not any(_is_name(w) for w in group) else "") + " ".join(group)
    return phrase


# Frames. {wh} {cop} {topic} read from the question; {q} the whole question (lower-cased first letter).
EN_QUESTION_FRAMES = [
    ("en_direct", "{Wh} {cop} {topic}?"),
    ("en_indirect", "Do you know {wh} {topic} {cop}?"),
    ("en_polite", "Could you tell me {wh} {topic} {cop}?"),
    ("en_remind", "Remind me: {wh} {cop} {topic}?"),
    ("en_casual", "Hey, quick one, {wh}'s {topic} again?"),
    ("en_topic_first", "{Topic}: {wh} {cop} it?"),
    ("en_formal", "Please state {wh} {topic} {cop}."),
    ("en_need", "I need to know {wh} {topic} {cop}."),
]
PL_QUESTION_FRAMES = [
    ("pl_direct", "{Wh} {cop} {topic}?"),
    ("pl_indirect", "Czy wiesz, {wh} {cop} {topic}?"),
    ("pl_remind", "Przypomnij mi, {wh} {cop} {topic}."),
    ("pl_tell", "Powiedz mi, {wh} {cop} {topic}."),
    ("pl_casual", "Hej, {wh} właściwie {cop} {topic}?"),
    ("pl_topic_first", "{Topic} – {wh} {cop}?"),
    ("pl_formal", "Uprzejmie proszę o informację, {wh} {cop} {topic}."),
]
GENERIC_FRAMES = {
    "en": [("en_quick", "Quick question: {q}"), ("en_please", "Please answer this: {q}"),
           ("en_brief", "{Q} A short answer, please.")],
    "pl": [("pl_quick", "Szybkie pytanie: {q}"), ("pl_please", "Proszę o odpowiedź: {q}"),
           ("pl_brief", "{Q} Odpowiedz krótko.")],
}
_EN_WH_FOR_PL = {"jaki": "what", "jaka": "what", "jakie": "what", "co": "what", "jak": "what", "który": "which",
                 "która": "which", "które": "which", "kto": "who", "gdzie": "where", "kiedy": "when"}


def _fill(frame: str, q: Question, topic: str, wh: str, cop: str) -> str:
    text = frame.format(Wh=_cap(wh), wh=wh, cop=cop, topic=_low(topic), Topic=_cap(topic))
    return " ".join(text.split())


def _statement(q: Question, topic: str, entity: str, lang: str) -> str:
    """The fact as a sentence: "Port serwera X to 8080." / "The port of server X is 8080."."""
    if lang == "pl":
        # "X to Y" needs no case ending; "nazywa się" and "jest o 03:15" keep the question's own verb.
        verb = q.copula if q.copula.startswith("nazywa") or q.wh in ("kiedy", "gdzie") else "to"
        return f"{_cap(topic)} {verb} {entity}."
    if q.wh in ("when", "where") and entity.split(" ", 1)[0] in ("At", "On", "In"):
        entity = entity[:1].lower() + entity[1:]
    return f"{_cap(topic)} {q.copula} {entity}."


def _english_entity(entity: str) -> str | None:
    """A Polish answer's entity as English words: a time "o 03:15" -> "at 03:15"; a bare name or number as
    it is; None when it holds Polish words."""
    m = re.fullmatch(r"o\s+(\d{1,2}[:.]\d{2})", entity)
    if m:
        return f"at {m[1]}"
    if language(entity) == "pl" or re.match(r"(?:w|na|o|od|do)\s", entity):
        return None
    return entity


def restate(question: str, answer: str, *, family: str, seed: int | str = 0,
            per_kind: int = 4) -> list[Restatement]:
    """Restatements of one lesson (its question and answer), at most `per_kind` of each kind and language,
    none equal to the lesson itself; each carries `family`. Deterministic for the same inputs and seed."""
    question, answer = " ".join(question.split()), answer.strip()
    rng = random.Random(f"{seed}\0{family}\0{question}\0{answer}")
    q = parse_question(question)
    lang = q.lang if q else language(question)
    out: list[Restatement] = []
    seen = {(question.lower(), answer)}

    def add(prompt: str, ans: str, kind: str, lang_: str, template: str) -> None:
        if (prompt.lower(), ans) not in seen and prompt.strip() and ans.strip():
            seen.add((prompt.lower(), ans))
            out.append(Restatement(prompt, ans, family, kind, lang_, template))

    if q is None:
        frames = GENERIC_FRAMES[lang]
        for name, frame in rng.sample(frames, min(per_kind, len(frames))):
            whole = question if question[-1:] in "?.!" else question + "."
            add(frame.format(q=_low(whole), Q=_cap(whole)), answer, "question", lang, name)
        return out

    entity = answer_entity(answer, lang)
    # Several answer forms: the lesson's own, the fact as a sentence, the bare entity.
    answers = [answer]
    if entity:
        answers += [_statement(q, q.topic, entity, lang), f"{entity}."]
    frames = PL_QUESTION_FRAMES if lang == "pl" else EN_QUESTION_FRAMES
    picked = rng.sample(frames, min(per_kind, len(frames)))
    for i, (name, frame) in enumerate(picked):
        add(_fill(frame, q, q.topic, q.wh, q.copula), answers[i % len(answers)], "question", lang, name)

    if lang == "pl":  # the same question in English frames: the topic translated, or kept as people mix
        english = translate_topic(q.topic)
        wh = _EN_WH_FOR_PL.get(q.wh, "what")
        cross = english or q.topic
        tag = "en" if english else "pl+en"
        en_q = Question("en", wh, "is", cross)
        en_entity = _english_entity(entity) if entity else None
        en_answers = [answer]  # nothing better: the lesson's own answer
        if en_entity and english:
            en_answers = [f"{_cap(english)} is {en_entity}.", f"{_cap(en_entity)}."]
        elif en_entity:
            en_answers = [f"{_cap(en_entity)}.", answer]
        for i, (name, frame) in enumerate(rng.sample(EN_QUESTION_FRAMES, min(per_kind, len(EN_QUESTION_FRAMES)))):
            add(_fill(frame, en_q, cross, wh, "is"), en_answers[i % len(en_answers)], "question", tag, name)

    if entity is None:
        return out
    statement = _statement(q, q.topic, entity, lang)
    if lang == "pl":
        stem = statement[: -len(entity) - 1].rstrip()
        prompts = [("pl_know", f"Co wiesz na temat: {_low(q.topic)}?"), ("pl_fact", f"Podaj fakt: {_low(q.topic)}.")]
        clozes = [("pl_cloze", f"Dokończ zdanie: {stem} …")]
        reverses = [("pl_reverse_what", f"Czym jest {entity}?"), ("pl_reverse_means", f"Co oznacza {entity}?")]
        reverse_answer = f"{_cap(entity)} to {_low(q.topic)}."
    else:
        stem = statement[: -len(entity) - 1].rstrip()
        prompts = [("en_know", f"What do you know about {_low(q.topic)}?"),
                   ("en_fact", f"State the fact about {_low(q.topic)}.")]
        clozes = [("en_cloze", f"Complete the sentence: {stem} ...")]
        who = q.wh == "who"
        reverses = [("en_reverse_what", f"{'Who' if who else 'What'} is {entity}?"),
                    ("en_reverse_which", f"What does {entity} refer to?")]
        reverse_answer = f"{_cap(entity)} is {_low(q.topic)}."
    for name, prompt in prompts[:per_kind]:
        add(prompt, statement, "statement", lang, name)
    for name, prompt in clozes[:per_kind]:
        add(prompt, entity, "cloze", lang, name)
    if q.wh not in ("when", "where", "kiedy", "gdzie"):  # "X is at 03:15" reversed is no question people ask
        for name, prompt in reverses[:per_kind]:
            add(prompt, reverse_answer, "reverse", lang, name)
    return out


def augment(lessons: list[tuple[str, str, str]], *, seed: int | str = 0,
            per_kind: int = 4) -> list[Restatement]:
    """`restate` over (family, question, answer) triples, in order."""
    out: list[Restatement] = []
    for family, question, answer in lessons:
        out += restate(question, answer, family=family, seed=seed, per_kind=per_kind)
    return out
