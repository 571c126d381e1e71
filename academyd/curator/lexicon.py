"""Bilingual dictionaries for code-switched restatements: a lesson asked with some of its words in the other
language.

A small model that learnt a fact from English lessons does not answer it asked in Polish, and one asked in
Polish synonyms no lesson used it answers with another fact: it knows the words only as they were taught.
Code-switching the training questions with a bilingual dictionary (CoSDA-ML, Qin et al., IJCAI 2020) puts
the other language's words for the same things (and, through the dictionary's several senses, some of
their synonyms) beside the fact, with no model.

The dictionaries are FreeDict's English-Polish and Polish-English in dictd format (Debian's
dict-freedict-eng-pol and dict-freedict-pol-eng, /usr/share/dictd; scripts/install-system-deps installs
them). `load()` reads a pair once per process; missing files give None, and the curator then makes no
code-switched restatements and says so in the manifest. Words are looked up by their lemma (simplemma), so
"machines" finds "machine" and "serwerowni" finds "serwerownia"; translations are kept when they read as
words of the target language (wordfreq), first sense first.
"""

from __future__ import annotations

import gzip
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DEFAULT_DIR = Path("/usr/share/dictd")
FILES = {("en", "pl"): "freedict-eng-pol", ("pl", "en"): "freedict-pol-eng"}
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
# Words this frequent (wordfreq's Zipf scale) are function words: a question keeps its own.
FUNCTION_ZIPF = 6.0
MAX_SENSES = 2  # translations considered per word, first sense first
_WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")


def _b64(text: str) -> int:
    n = 0
    for c in text:
        n = n * 64 + _B64[c]
    return n


def read_dictd(index: Path, data: Path) -> dict[str, str]:
    """{headword (lower case): entry text} of a dictd dictionary (.index and .dict.dz or .dict)."""
    raw = gzip.decompress(data.read_bytes()) if data.suffix == ".dz" else data.read_bytes()
    out: dict[str, str] = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database"):
            continue
        start, length = _b64(parts[1]), _b64(parts[2])
        text = raw[start:start + length].decode("utf-8", "replace")
        key = parts[0].lower()
        out[key] = f"{out[key]}\n{text}" if key in out else text
    return out


def _clean(text: str) -> str:
    text = re.sub(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>|/[^/\n]*/", " ", text)
    return re.sub(r"\b[IVX]+\.\s|\b\d+\.", " ", text)


def _reads_as(word: str, lang: str, other: str) -> bool:
    from wordfreq import zipf_frequency

    return zipf_frequency(word, lang) >= 2.0 and zipf_frequency(word, lang) >= zipf_frequency(word, other)


def senses(entry: str, src: str, dst: str) -> list[str]:
    """Translations in an entry, first sense first: single words or two-word phrases that read as `dst`.
    English-Polish entries number their senses on lines ("1.  pomieszczenie, pokój"; phrases after " - ",
    compounds under "<N Comp>", skipped); Polish-English ones give each sense's English on its own line,
    followed by a Polish definition (kept out by the language check)."""
    found: list[str] = []
    for n, line in enumerate(entry.splitlines()):
        if "Comp>" in line or "Phras>" in line or ":" in line or line.strip().startswith("-"):
            continue
        if n == 0:  # "headword /pron/ <N>   translation": the headword is not a translation
            line = line.split("/", 2)[-1] if line.count("/") >= 2 else ""
        for item in re.split(r"[,;]", _clean(line)):
            words = item.split()
            if not 1 <= len(words) <= 2 or not all(_WORD.fullmatch(w) for w in words):
                continue
            phrase = " ".join(w.lower() for w in words)
            if all(_reads_as(w, dst, src) for w in phrase.split()) and phrase not in found:
                found.append(phrase)
    return found


@dataclass(frozen=True)
class Lexicon:
    """One direction, `src` to `dst`: lemma -> translations (first sense first)."""

    src: str
    dst: str
    entries: dict[str, str]

    def translations(self, word: str) -> list[str]:
        import simplemma

        lower = word.lower()
        for key in dict.fromkeys((lower, simplemma.lemmatize(lower, lang=self.src))):
            entry = self.entries.get(key)
            if entry:
                found = senses(entry, self.src, self.dst)
                if found:
                    return found[:MAX_SENSES]
        return []


@lru_cache(maxsize=4)
def load(src: str, dst: str, directory: str = str(DEFAULT_DIR)) -> Lexicon | None:
    """The `src` -> `dst` dictionary in `directory`, or None when its files are not there."""
    name = FILES.get((src, dst))
    if name is None:
        return None
    base = Path(directory)
    index = base / f"{name}.index"
    data = next((p for p in (base / f"{name}.dict.dz", base / f"{name}.dict") if p.is_file()), None)
    if not index.is_file() or data is None:
        return None
    return Lexicon(src, dst, read_dictd(index, data))


def switch(text: str, lexicon: Lexicon, rng: random.Random, *, rate: float,
           keep: frozenset[str] = frozenset()) -> str | None:
    """`text` with each content word (not a function word, not in `keep`) replaced by a translation with
    probability `rate`: at rate 1 every word by its first sense, else by one of its first MAX_SENSES at
    random. None when no word was replaced."""
    from wordfreq import zipf_frequency

    replaced = 0

    def one(m: re.Match[str]) -> str:
        nonlocal replaced
        word = m.group(0)
        if word.lower() in keep or len(word) < 3 or zipf_frequency(word, lexicon.src) >= FUNCTION_ZIPF:
            return word
        options = lexicon.translations(word)
        if not options or rng.random() >= rate:
            return word
        replaced += 1
        return options[0] if rate >= 1.0 else rng.choice(options)

    out = _WORD.sub(one, text)
    return out if replaced else None
