"""Secrets never reach a dataset: detect-secrets over every field, behind a prefilter that is sound.

detect-secrets costs ~0.3 ms a line; a dataset has millions of lines. The prefilter is built from the
active plugins themselves (each regex plugin's own denylist, the keyword plugin's keyword list, and the
quoted-string shape the entropy plugins require), so a line it passes over is a line no plugin could
flag. Running ~50 plugin regexes over every text is itself slow (Python's engine tries each position),
so each regex is gated by the literals any match of it must contain, read from its parse tree (the
idea of RE2's prefilter): a regex runs only on texts that hold one of each of its literal sets,
compared case-folded. A plugin the prefilter does not understand turns it off (every line is
scanned): slower, never weaker. Lines the prefilter flags go through detect-secrets' own line engine,
filters included.

Redaction replaces each finding (whole private-key blocks, whole tokens where a plugin reports only a
prefix) with `<REDACTED>` and re-scans; an example that still shows a secret is dropped, not written.
"""

from __future__ import annotations

import re
import re._constants as C  # noqa: PLC2701 - the regex parse tree gives the prefilter its literals
import re._parser as P  # noqa: PLC2701
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from detect_secrets.core.scan import _process_line_based_plugins, get_plugins
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.high_entropy_strings import HighEntropyStringsPlugin
from detect_secrets.plugins.keyword import QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP, REGEX_BY_FILETYPE, KeywordDetector
from detect_secrets.settings import default_settings, get_settings
from detect_secrets.util.filetype import determine_file_type

REDACTED = "<REDACTED>"
# The keyword plugin reads `key: value` and `key = value` without quotes only in config-like files.
_SCAN_AS = "example.yaml"
_PRIVATE_BLOCK = re.compile(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----.*?(-----END[A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----|\Z)",
    re.DOTALL,
)
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-./+=~]*")
_TOKEN_CHARS_BACK = re.compile(r"[A-Za-z0-9_\-./+=~]*$")


# Filters turned off inside a session, and why:
_OFF = (
    # Verification would send a found secret to its provider's API: never, from a curator.
    "detect_secrets.filters.common.is_ignored_due_to_verification_policies",
    # Its regex backtracks quadratically on long lines (4 ms for 400 characters, per line); the same
    # test, written linearly, is applied to the findings afterwards (`_is_indirect_reference`).
    "detect_secrets.filters.heuristic.is_indirect_reference",
)
# detect-secrets' `([^\v=!:]*)\s*(:=?|[!=]{1,3})\s*([\w.-]+[\[\(][^\v]*[\]\)])` matches exactly when this does
# (its first two parts may match empty), without the quadratic prefix.
_INDIRECT = re.compile(r"(:=?|[!=]{1,3})\s*[\w.-]+[\[\(][^\v]*[\]\)]")


def _is_indirect_reference(line: str) -> bool:
    return len(line) <= 1000 and bool(_INDIRECT.search(line))


@dataclass(frozen=True)
class Finding:
    type: str
    value: str
    line: str


class SecretScanner:
    """Find and redact secrets in text. Use inside `scanner.session()` (detect-secrets' settings)."""

    def __init__(self) -> None:
        self.lines_scanned = 0
        self.texts_flagged = 0
        # (gate strings, found in the folded text; plugin regex; every match starts with a gate string)
        self._gated: list[tuple[frozenset[str], re.Pattern[str], bool]] = []
        self._ungated: list[re.Pattern[str]] = []
        self._scan_everything = False

    @contextmanager
    def session(self) -> Iterator[SecretScanner]:
        with default_settings():
            get_settings().disable_filters(*_OFF)
            self._build_prefilter()
            yield self

    def _build_prefilter(self) -> None:
        patterns: list[re.Pattern[str]] = []
        for plugin in get_plugins():
            if isinstance(plugin, RegexBasedDetector):
                patterns.extend(plugin.denylist)
            elif isinstance(plugin, KeywordDetector) and plugin.keyword_exclude is None:
                filetype = determine_file_type(_SCAN_AS)
                patterns.extend(REGEX_BY_FILETYPE.get(filetype, QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP))
            elif isinstance(plugin, HighEntropyStringsPlugin):
                # Quoted strings only (non-eager scanning), and the entropy limit needs length:
                # hex > 3.0 bits needs >= 9 characters, base64 > 4.5 bits needs >= 23.
                chars = re.escape(plugin.charset)
                patterns.append(re.compile(r"(['\"])[" + chars + r"]{9,}\1"))
            else:  # unknown plugin: no sound shortcut, scan every line
                self._scan_everything = True
        self._gated, self._ungated = [], []
        # MULTILINE: detect-secrets sees one line at a time, where ^ and $ are line boundaries.
        patterns = [re.compile(p.pattern, p.flags | re.MULTILINE) for p in patterns]
        for pattern in patterns:
            plan = best_gate(pattern)
            if plan is None:
                self._ungated.append(pattern)
                continue
            strings, leading = plan
            self._gated.append((strings, pattern, leading))

    def suspect_lines(self, texts: list[str]) -> list[list[int]]:
        """For each text, the (0-based) lines some plugin regex matches: the only lines worth scanning."""
        hits: list[set[int]] = [set() for _ in texts]
        if self._scan_everything:
            return [list(range(len(t.splitlines()) or 1)) for t in texts]
        sep = "\n\x00\n"
        joined = sep.join(texts)
        starts = _offsets(texts, len(sep))
        folded_texts = [fold(t) for t in texts]
        folded = sep.join(folded_texts)
        fstarts = _offsets(folded_texts, len(sep))
        for pattern in self._ungated:  # few and cheap: over the whole batch at once
            for m in pattern.finditer(joined):
                i = bisect_right(starts, m.start()) - 1
                _mark(hits[i], texts[i], m.start() - starts[i], m.end() - starts[i], pattern)
        lines_of: dict[int, tuple[list[str], list[int], bool]] = {}
        positions: dict[frozenset[str], list[int]] = {}
        for gate, pattern, leading in self._gated:
            # A line can match only if it holds a gate string (casefolding keeps newlines where they
            # are, so the line number in the folded text is the line number in the text); the regex then
            # runs on that line alone, as detect-secrets will. When every match starts with a gate string,
            # it is tried only where one starts (if casefolding kept the text's character positions).
            done: set[tuple[int, int]] = set()
            if gate not in positions:  # str.find per string: many times faster than a regex alternation
                positions[gate] = sorted({p for x in gate for p in _find_all(folded, x)})
            for pos in positions[gate]:
                i = bisect_right(fstarts, pos) - 1
                line_no = folded.count("\n", fstarts[i], pos)
                if (i, line_no) in done:
                    continue
                info = lines_of.get(i)
                if info is None:
                    lines = texts[i].split("\n")
                    line_starts = _offsets(lines, 1)
                    info = lines_of[i] = (lines, line_starts, len(folded_texts[i]) == len(texts[i]))
                lines, line_starts, aligned = info
                if line_no >= len(lines):
                    continue
                line = lines[line_no]
                if leading and aligned:
                    found = pattern.match(line, pos - fstarts[i] - line_starts[line_no]) is not None
                else:
                    found = pattern.search(line) is not None
                    done.add((i, line_no))
                if found:
                    hits[i].add(line_no)
                    done.add((i, line_no))
        return [sorted(h) for h in hits]

    def find_many(self, texts: list[str]) -> list[list[Finding]]:
        out: list[list[Finding]] = []
        for text, suspects in zip(texts, self.suspect_lines(texts), strict=True):
            if not suspects:
                out.append([])
                continue
            all_lines = text.splitlines() or [text]
            lines = [all_lines[i] for i in suspects if i < len(all_lines)]
            self.lines_scanned += len(lines)
            found = []
            for secret in _process_line_based_plugins(list(enumerate(lines, 1)), _SCAN_AS):
                line = lines[secret.line_number - 1]
                if not _is_indirect_reference(line.rstrip()):
                    found.append(Finding(secret.type, secret.secret_value or "", line))
            out.append(found)
        return out

    def find(self, text: str) -> list[Finding]:
        return self.find_many([text])[0] if text else []

    def redact(self, text: str, findings: list[Finding]) -> str:
        for f in findings:
            if f.type == "Private Key":
                text = _PRIVATE_BLOCK.sub(REDACTED, text)
                # a BEGIN line without the block shape (quoted, escaped newlines): take the line
                if f.line.strip() and f.line.strip() in text:
                    text = text.replace(f.line.strip(), REDACTED)
                continue
            for value in _whole_tokens(f.value, f.line):  # longest first
                if value:
                    text = text.replace(value, REDACTED)
        return text

    def clean_many(self, texts: list[str]) -> list[tuple[str, Counter[str], bool]]:
        """Per text: (redacted text, finding types, clean afterwards). Not clean: the caller must drop it."""
        out = []
        for text, findings in zip(texts, self.find_many(texts), strict=True):
            if not findings:
                out.append((text, Counter(), True))
                continue
            self.texts_flagged += 1
            types = Counter(f.type for f in findings)
            ok = False
            for _ in range(3):
                text = self.redact(text, findings)
                findings = self.find(text)
                if not findings:
                    ok = True
                    break
            out.append((text, types, ok))
        return out

    def clean(self, text: str) -> tuple[str, Counter[str], bool]:
        return self.clean_many([text])[0]


def _find_all(text: str, needle: str) -> list[int]:
    """Every start of `needle` in `text`, overlapping ones included."""
    out, pos = [], text.find(needle)
    while pos != -1:
        out.append(pos)
        pos = text.find(needle, pos + 1)
    return out


def _offsets(texts: list[str], sep_len: int) -> list[int]:
    starts, pos = [], 0
    for t in texts:
        starts.append(pos)
        pos += len(t) + sep_len
    return starts


def _mark(lines: set[int], text: str, start: int, end: int, pattern: re.Pattern[str]) -> None:
    """Mark the lines a match touches. A match that runs over several lines (several plugin regexes
    let `[^\\v...]` cross newlines; in Python `\\v` is only the vertical tab) marks only those of its
    lines the regex matches on their own, which is how detect-secrets will see them."""
    first = text.count("\n", 0, start)
    span = text.count("\n", start, end)
    if span == 0:
        lines.add(first)
        return
    begin = text.rfind("\n", 0, start) + 1
    for j, line in enumerate(text[begin:].split("\n", span + 1)[: span + 1]):
        if pattern.search(line):
            lines.add(first + j)


def _whole_tokens(value: str, line: str) -> list[str]:
    """The secret as written: plugins that capture only a prefix (GitHub's `ghp`) get the whole token."""
    out = [value] if len(value) >= 8 else []
    start = line.find(value)
    while start != -1:
        head = _TOKEN_CHARS_BACK.search(line, 0, start)
        tail = _TOKEN_CHARS.match(line, start + len(value))
        begin = head.start() if head else start
        end = tail.end() if tail else start + len(value)
        out.append(line[begin:end])
        start = line.find(value, start + 1)
    return sorted(set(out), key=len, reverse=True)


def fold(text: str) -> str:
    """Case-fold so that whatever a regex matches under IGNORECASE contains its folded literals."""
    return text.casefold().replace("ı", "i")


def required_literals(pattern: re.Pattern[str]) -> list[frozenset[str]]:
    """Sets of literals, one of each of which every match of `pattern` contains (folded).

    Sound by construction: only literal runs, groups, alternations whose every branch has a literal,
    and repeats of at least one contribute; anything else (classes, anchors, lookarounds) is free.
    """
    try:
        tree = P.parse(pattern.pattern, pattern.flags)
    except Exception:  # an unknown construct: no gate, the regex always runs
        return []
    return [s for s in _factors(list(tree)) if s and all(s)]


def best_gate(pattern: re.Pattern[str]) -> tuple[frozenset[str], bool] | None:
    """(strings one of which every match contains, whether every match starts with one), or None.

    The strings have >= 2 characters and there are at most 32; a set every match starts with is
    preferred (the regex then runs only where one starts), else the most selective contained set.
    """
    def usable(c: frozenset[str]) -> bool:
        return bool(c) and min(map(len, c)) >= 2 and len(c) <= 32

    try:
        leading, _ = _prefixes(list(P.parse(pattern.pattern, pattern.flags)))
    except Exception:
        leading = set()
    starts = frozenset(fold(x) for x in leading)
    if usable(starts):
        return starts, True
    candidates = [c for c in required_literals(pattern) if usable(c)]
    if not candidates:
        return None
    # longer strings are rarer (up to ~4 characters, past which all are rare); fewer strings scan faster
    return max(candidates, key=lambda c: (min(min(map(len, c)), 4), -len(c))), False


def _prefixes(items: list[tuple[object, object]]) -> tuple[set[str], bool]:
    """(prefixes every match of the sequence starts with one of, whether they cover the whole sequence)."""
    out = {""}
    for op, av in items:
        if op is C.LITERAL:
            out = {p + chr(av) for p in out}  # type: ignore[arg-type]
            continue
        if op is C.SUBPATTERN:
            sub, complete = _prefixes(list(av[-1]))  # type: ignore[index]
        elif op is C.BRANCH:
            parts = [_prefixes(list(alt)) for alt in av[1]]  # type: ignore[index]
            sub = set().union(*(p for p, _ in parts))
            complete = all(c for _, c in parts)
        else:
            return out, False
        out = {p + x for p in out for x in sub}
        if not complete or len(out) > 32:
            return out, False
    return out, True


def _factors(items: list[tuple[object, object]]) -> list[frozenset[str]]:
    factors: list[frozenset[str]] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            factors.append(frozenset({fold("".join(run))}))
            run.clear()

    for op, av in items:
        if op is C.LITERAL:
            run.append(chr(av))  # type: ignore[arg-type]
            continue
        flush()
        if op is C.SUBPATTERN:
            factors.extend(_factors(list(av[-1])))  # type: ignore[index]
        elif op is C.ATOMIC_GROUP:
            factors.extend(_factors(list(av)))  # type: ignore[call-overload]
        elif op is C.BRANCH:
            best: list[frozenset[str]] = []
            for alt in av[1]:  # type: ignore[index]
                f = _factors(list(alt))
                if not f:
                    best = []
                    break
                best.append(max(f, key=lambda s: min(map(len, s))))
            if best:
                factors.append(frozenset().union(*best))
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
            lo, _hi, sub = av  # type: ignore[misc]
            if lo >= 1:
                factors.extend(_factors(list(sub)))
    flush()
    return factors
