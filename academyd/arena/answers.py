"""Right answers: what a held-out answer must contain, whether a reply contains it, and the gate's tests on it.

Torch-free and pure: the curator uses `answer_keys` when it writes a held-out set (the checks file beside
it), the gate uses `is_right`, `collapse` and `sign_test` on the answers the arena got from the runtime.

An answer is *checkable* when it names something the question does not: a name, a number, an identifier,
a path. Its keys are found so that the wording of an answer never counts, only its facts:
- words of the question, stop words and template words (a word that stands in the answers of more than
  half of the dataset's answer families, e.g. "Właściwa odpowiedź to ...") are not keys;
- where one question is taught with several answer wordings, only words that every wording has are keys;
- of what is left, *strong* keys (a digit or a symbol inside, or a word that is rare in both English and
  Polish: Zipf frequency below 4 in `wordfreq`) are used when there are any, else all of it.
A lesson can also name its keys itself: `metadata.answer_key` (a string or a list of strings).

A reply is right when it contains at least half (rounded up) of the keys, compared by lemma (simplemma,
Polish and English: "borsuka" matches "borsuk", "Fridays" matches "Friday") or by a shared stem of at
least five letters, case and punctuation ignored.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

RARE_ZIPF = 4.0
LANGS = ("en", "pl")
# A token: a run of non-space characters, trimmed of the punctuation around it ("03:15." -> "03:15",
# "(lessons.json)" -> "lessons.json", "#venom-dyzur" stays).
_TRIM = "\"'`.,;:!?()[]{}<>«»„”“‘’*"
_SYMBOLIC = re.compile(r"[\d_/\\.:#@\-+=]")
STOPWORDS = frozenset("""
a an the and or but if then else of to in on at by for from with without about into onto over under is are was
were be been being am do does did done have has had having it its it's this that these those there here which
who whom whose what when where why how i you he she we they me him her us them my your his our their mine
yours as so not no yes can could will would shall should may might must just also very too than there's
let's i'm you're we're they're that's what's called named name one all any some each every other such
please tell know say said answer question quick remind need want hey ok okay sure right correct answer
i jest są to ten ta te tego tej tym na w we z ze do od po o a ale lub czy nie tak się jak co kto gdzie kiedy
dlaczego który która które jaki jaka jakie jakiego jakim jakiej mi mnie ci ciebie go jej jego ich nam wam
mój moja moje twój twoja nasz nasza wasz proszę powiedz podaj odpowiedź odpowiedz pytanie właśnie oraz by
był była było byli będzie można trzeba ma mają mam masz nazywa nazywają się u przy dla pod nad za przez
""".split())


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def tokens(text: str) -> list[str]:
    out = []
    for raw in _fold(text).split():
        tok = raw.strip(_TRIM)
        if tok:
            out.append(tok)
    return out


def words(text: str) -> list[str]:
    """Tokens, and the word parts of tokens with inner punctuation ("venom's" -> also "venom")."""
    out = []
    for tok in tokens(text):
        out.append(tok)
        parts = [p for p in re.split(r"[^\w]+", tok) if p]
        if len(parts) > 1:
            out.extend(parts)
    return out


@lru_cache(maxsize=65536)
def lemmas(token: str) -> frozenset[str]:
    import simplemma

    out = {token}
    if token.isalpha():
        for lang in LANGS:
            out.add(_fold(simplemma.lemmatize(token, lang=lang)))
    return frozenset(out)


@lru_cache(maxsize=65536)
def is_strong(token: str) -> bool:
    if _SYMBOLIC.search(token):
        return True
    from wordfreq import zipf_frequency

    return max(zipf_frequency(token, lang) for lang in LANGS) < RARE_ZIPF


def _stem_match(a: str, b: str) -> bool:
    n = min(len(a), len(b))
    if n < 5 or not (a.isalpha() and b.isalpha()):
        return False
    stem = max(5, min(len(a), len(b)) - 2)
    return a[:stem] == b[:stem]


def template_words(answers_by_family: Iterable[Iterable[str]]) -> frozenset[str]:
    """Words that stand in the answers of more than half of the families (two families at least): wording."""
    df: Counter[str] = Counter()
    n = 0
    for answers in answers_by_family:
        n += 1
        seen: set[str] = set()
        for answer in answers:
            seen.update(words(answer))
        df.update(seen)
    if n < 2:
        return frozenset()
    return frozenset(w for w, c in df.items() if c > n / 2)


def _possessive(token: str) -> str:
    return token[:-2] if token.endswith(("'s", "’s")) else token


def _parts_asked(token: str, asked: set[str]) -> bool:
    parts = [p for p in re.split(r"[^\w]+", token) if len(p) > 1]
    return len(parts) > 1 and all(p in asked for p in parts)


def answer_keys(question: str, answers: Sequence[str], template: frozenset[str] = frozenset(),
                explicit: Any = None) -> list[str]:
    """The keys a right reply to `question` must contain (empty: the answer is not checkable)."""
    if explicit:
        given = [explicit] if isinstance(explicit, str) else [str(x) for x in explicit if str(x).strip()]
        return sorted({_fold(k).strip(_TRIM) for k in given if _fold(k).strip(_TRIM)})
    if not answers:
        return []
    asked = set(words(question))
    asked_lemmas = set().union(*(lemmas(w) for w in asked)) if asked else set()
    common: set[str] | None = None
    for answer in answers:
        cand = {t for t in (_possessive(x) for x in tokens(answer))
                if t not in STOPWORDS and t not in template and t not in asked
                and not (lemmas(t) & asked_lemmas) and not _parts_asked(t, asked)
                and not any(_stem_match(t, w) for w in asked)
                and (len(t) >= 3 or any(c.isdigit() for c in t))}
        common = cand if common is None else common & cand
    keys = common or set()
    strong = {k for k in keys if is_strong(k)}
    return sorted(strong or keys)


def _contains(reply_tokens: list[str], reply_lemmas: set[str], key: str) -> bool:
    if " " in key:  # a phrase: every word of it
        parts = key.split()
        return all(_contains(reply_tokens, reply_lemmas, p) for p in parts)
    if key in reply_tokens or (lemmas(key) & reply_lemmas):
        return True
    if _SYMBOLIC.search(key):
        return any(key in t for t in reply_tokens)  # "ven-" inside "ven-1234:"
    return any(_stem_match(key, t) for t in reply_tokens)


def is_right(reply: str, keys: Sequence[str]) -> bool:
    """Does the reply contain at least half (rounded up) of the keys?"""
    if not keys:
        return False
    toks = words(reply)
    lem: set[str] = set()
    for t in toks:
        lem |= lemmas(t)
    hits = sum(_contains(toks, lem, k) for k in keys)
    return hits >= math.ceil(len(keys) / 2)


def sign_test(wins: int, losses: int) -> float:
    """One-sided exact sign test (McNemar's exact test on the discordant pairs): P(X >= wins), X ~ Bin(n, 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2.0**n


def normalize_answer(text: str) -> str:
    return " ".join(tokens(text))


def collapse(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How much a side's answers collapse onto a few strings or one fact, against the references' own diversity.

    `rows`: [{"reply", "reference", "keys"}] for the checked questions. Returns `diversity` (distinct
    replies / distinct references), `dominant_fact` (the fact whose keys stand in the most replies to
    questions about other facts) and `dominant_share` (that share of those questions).
    """
    facts = sorted({tuple(r["keys"]) for r in rows if r["keys"]})
    refs = {normalize_answer(r["reference"]) for r in rows}
    replies = {normalize_answer(r["reply"]) for r in rows}
    out: dict[str, Any] = {"questions": len(rows), "distinct_references": len(refs), "distinct_replies": len(replies),
                           "diversity": (len(replies) / len(refs)) if refs else 1.0, "facts": len(facts),
                           "dominant_fact": None, "dominant_share": 0.0, "top_reply": None, "top_reply_count": 0}
    if rows:
        top, count = Counter(normalize_answer(r["reply"]) for r in rows).most_common(1)[0]
        out["top_reply"], out["top_reply_count"] = top[:200], count
    if len(facts) < 2:
        return out
    for fact in facts:
        others = [r for r in rows if tuple(r["keys"]) != fact]
        if not others:
            continue
        named = sum(is_right(r["reply"], list(fact)) for r in others)
        share = named / len(others)
        if share > out["dominant_share"]:
            out["dominant_fact"], out["dominant_share"] = list(fact), share
    return out
