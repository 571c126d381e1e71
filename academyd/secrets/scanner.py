"""The secret scanner: every rule's trigger in one Hyperscan database, the rules on the lines it flags.

Thread-safe by construction: the rules and the compiled database are read-only after `__init__`, each
thread scans with its own Hyperscan scratch space, and nothing reads a process-wide setting (the cause of
the old race: detect-secrets keeps its settings in one global object that concurrent
`default_settings()` blocks entered and left under each other). Of detect-secrets only the stock
plugins' regexes are used, as rules of their own; its engine, its settings and its verification
(which would send a found secret to its provider) are never called.

A line is the unit, as in detect-secrets: a rule matches within one line (a private key's block is
redacted whole).
"""

from __future__ import annotations

import json
import re
import threading
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import hyperscan

from academyd.secrets.rules import RULES, Rule, secret_of

REDACTED = "<REDACTED>"
WITHHELD = "(withheld: it holds a secret that could not be redacted)"
_PRIVATE_BLOCK = re.compile(
    r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----|\Z)",
    re.DOTALL,
)
_JSON_ESCAPE = re.compile(r'\\(["\\/bfnrt]|u[0-9a-fA-F]{4})')
_JSON_CHARS = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_PUTTY_BLOCK = re.compile(r"PuTTY-User-Key-File-\d.*?(?:Private-MAC: \S+|\Z)", re.DOTALL)
_SEP = b"\n"
_NO_FINDINGS: Counter[str] = Counter()  # shared by every clean text: read it, never change it

# detect-secrets plugins replaced by rules measured on the corpus (tests/secrets): the keyword and
# entropy plugins (quoted hashes and base64 data are not secrets; a password in prose is), Basic Auth
# (its rule refuses RFC 3986 sub-delimiters in the password), the public-IP one (an address is not a
# credential).
_STOCK_REPLACED = {"KeywordDetector", "Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector",
                   "BasicAuthDetector",
                   # our GitLab rules take every prefix it knows, at any length (its bounded repeats cost
                   # Hyperscan 1 s to compile)
                   "GitLabTokenDetector"}


def stock_rules() -> list[Rule]:
    """detect-secrets' own token plugins, as rules: its denylist regexes, triggered by themselves."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.plugins.base import RegexBasedDetector

    out = []
    for kind, cls in sorted(get_mapping_from_secret_type_to_class().items()):
        if cls.__name__ in _STOCK_REPLACED or not issubclass(cls, RegexBasedDetector):
            continue
        for pattern in cls().denylist:
            out.append(Rule(kind, pattern, pattern.pattern, group=0, caseless=bool(pattern.flags & re.IGNORECASE),
                            prefilter=True, flags={"stock": True}))
    return out


@dataclass(frozen=True)
class Finding:
    type: str
    value: str
    line: str


class Scanner:
    """Find and redact secrets in text. One per process (`academyd.secrets.scanner()`), any thread."""

    def __init__(self, rules: Iterable[Rule] | None = None, *, stock: bool = True) -> None:
        self.rules: list[Rule] = list(RULES if rules is None else rules) + (stock_rules() if stock else [])
        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        flags = [
            (hyperscan.HS_FLAG_CASELESS if r.caseless else 0)
            | (hyperscan.HS_FLAG_PREFILTER if r.prefilter else 0)
            | (hyperscan.HS_FLAG_DOTALL * 0)
            for r in self.rules
        ]
        self._db.compile(
            expressions=[r.trigger.encode() for r in self.rules], ids=list(range(len(self.rules))),
            elements=len(self.rules), flags=flags,
        )
        self._local = threading.local()

    # ------------------------------------------------------------ finding

    def _scratch(self) -> hyperscan.Scratch:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self._db)
        return scratch

    def candidates(self, texts: list[str]) -> dict[int, dict[int, set[int]]]:
        """{text index: {byte offset of a line: ids of the rules whose trigger fired on it}}, only for
        the texts where one fired."""
        encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
        hits: list[tuple[int, int]] = []
        self._db.scan(_SEP.join(encoded), match_event_handler=lambda rid, _f, to, _fl, _c: hits.append((to, rid)),
                      scratch=self._scratch())
        out: dict[int, dict[int, set[int]]] = {}
        if not hits:
            return out
        starts, pos = [], 0
        for e in encoded:
            starts.append(pos)
            pos += len(e) + 1
        for to, rid in hits:
            end = max(to - 1, 0)
            i = bisect_right(starts, end) - 1
            local = end - starts[i]
            line_start = encoded[i].rfind(b"\n", 0, local) + 1
            out.setdefault(i, {}).setdefault(line_start, set()).add(rid)
        return out

    def find_many(self, texts: list[str], stats: Counter[str] | None = None) -> list[list[Finding]]:
        out: list[list[Finding]] = [[] for _ in texts]
        for i, cands in self.candidates(texts).items():
            enc = texts[i].encode("utf-8", "surrogatepass")
            found: dict[tuple[str, str], Finding] = {}
            for line_start, rids in cands.items():
                end = enc.find(b"\n", line_start)
                line = enc[line_start: end if end != -1 else len(enc)].decode("utf-8", "surrogatepass")
                if stats is not None:
                    stats["lines_checked"] += 1
                for rid in sorted(rids):
                    for f in self._match(self.rules[rid], line):
                        found.setdefault((f.type, f.value), f)
            out[i] = list(found.values())
        return out

    def _match(self, rule: Rule, line: str) -> list[Finding]:
        out = []
        for m in rule.pattern.finditer(line):
            if rule.flags.get("stock"):
                value = m.group(1) if m.re.groups and m.group(1) and len(m.group(1)) >= 8 else m.group(0)
                value = value.strip(" \t=:\"'")
            else:
                value = secret_of(rule, m)
            if value and (rule.check is None or rule.check(value)):
                out.append(Finding(rule.kind, value, line))
        return out

    def full_scan(self, texts: list[str]) -> list[list[Finding]]:
        """Every rule on every line, no prefilter: what `find_many` must equal (tests)."""
        out = []
        for text in texts:
            found: dict[tuple[str, str], Finding] = {}
            for line in text.split("\n"):
                for rule in self.rules:
                    for f in self._match(rule, line):
                        found.setdefault((f.type, f.value), f)
            out.append(list(found.values()))
        return out

    def find(self, text: str) -> list[Finding]:
        return self.find_many([text])[0] if text else []

    # ------------------------------------------------------------ redacting

    @staticmethod
    def redact_findings(text: str, findings: list[Finding]) -> str:
        kinds = {f.type for f in findings}
        if "Private Key" in kinds:
            text = _PRIVATE_BLOCK.sub(REDACTED, text)
            text = _PUTTY_BLOCK.sub(REDACTED, text)
        values = {f.value for f in findings if f.type != "Private Key"}
        if "\\" in text:  # the same values as a JSON string holds them
            values |= {json.dumps(v, ensure_ascii=a)[1:-1] for v in list(values) for a in (True, False)}
        for value in sorted(values, key=len, reverse=True):
            text = text.replace(value, REDACTED)
        return text

    def _find_all_views(self, texts: list[str], stats: Counter[str] | None) -> list[list[Finding]]:
        """Findings in each text and in its JSON-unescaped view: a payload, a log line or an excerpt
        that is JSON shows `\\"password\\": \\"...\\"`, `\\n` and `\\u0142` where the rules expect the text."""
        found = self.find_many(texts, stats)
        escaped = [i for i, t in enumerate(texts) if "\\" in t]
        if escaped:
            views = self.find_many([_json_unescape(texts[i]) for i in escaped], stats)
            for i, extra in zip(escaped, views, strict=True):
                if extra:
                    seen = {(f.type, f.value) for f in found[i]}
                    found[i] = found[i] + [f for f in extra if (f.type, f.value) not in seen]
        return found

    def clean_many(self, texts: list[str], stats: Counter[str] | None = None) -> list[tuple[str, Counter[str], bool]]:
        """Per text: (redacted text, finding types, clean afterwards). Not clean: the caller must drop it."""
        out: list[tuple[str, Counter[str], bool]] = []
        for text, findings in zip(texts, self._find_all_views(texts, stats), strict=True):
            if not findings:
                out.append((text, _NO_FINDINGS, True))
                continue
            if stats is not None:
                stats["texts_flagged"] += 1
            types = Counter(f.type for f in findings)
            ok = False
            for _ in range(4):
                text = self.redact_findings(text, findings)
                findings = self._find_all_views([text], None)[0]
                if not findings:
                    ok = True
                    break
            out.append((text, types, ok))
        return out

    def scan_file(self, path: str, batch: int = 4096) -> Counter[str]:
        """Finding types in a text file (a dataset about to be trained on), read line by line."""
        found: Counter[str] = Counter()
        with open(path, encoding="utf-8", errors="surrogateescape") as fh:
            while lines := [line for _, line in zip(range(batch), fh, strict=False)]:
                for findings in self._find_all_views(lines, None):
                    found.update(f.type for f in findings)
        return found

    def clean(self, text: str) -> tuple[str, Counter[str], bool]:
        return self.clean_many([text])[0]

    def redact(self, text: str) -> str:
        """The text with its secrets redacted, or a notice in its place when that cannot be done."""
        cleaned, _, ok = self.clean(text)
        return cleaned if ok else WITHHELD

    def redact_obj(self, obj: Any) -> Any:
        """A copy of a JSON-like value (event payloads, status, log events) with every string redacted.

        A string under a dict key is scanned as `key: value`, so that the name gives the context
        (`{"password": "hunter2!x"}`); the key itself is scanned too.
        """
        leaves: list[str] = []

        def collect(o: Any, key: Any) -> None:
            if isinstance(o, str):
                leaves.append(f"{key}: {o}" if isinstance(key, str) else o)
            elif isinstance(o, dict):
                for k, v in o.items():
                    if isinstance(k, str):
                        leaves.append(k)
                    collect(v, k)
            elif isinstance(o, list | tuple):
                for v in o:
                    collect(v, None)

        collect(obj, None)
        if not leaves:
            return obj
        results = iter(self.clean_many(leaves))

        def rebuild(o: Any, key: Any) -> Any:
            if isinstance(o, str):
                text, types, ok = next(results)
                if not types:
                    return o
                if not ok:
                    return WITHHELD
                if isinstance(key, str):
                    prefix = f"{key}: "
                    return text[len(prefix):] if text.startswith(prefix) else WITHHELD
                return text
            if isinstance(o, dict):
                new = {}
                for k, v in o.items():
                    if isinstance(k, str):
                        kt, ktypes, kok = next(results)
                        nk = k if not ktypes else (kt if kok else WITHHELD)
                    else:
                        nk = k
                    new[nk] = rebuild(v, k)
                return new
            if isinstance(o, list | tuple):
                items = [rebuild(v, None) for v in o]
                return items if isinstance(o, list) else tuple(items)
            return o

        return rebuild(obj, None)


def _json_unescape(text: str) -> str:
    """Undo JSON string escapes wherever they are (the text need not be valid JSON: an excerpt is cut)."""
    return _JSON_ESCAPE.sub(lambda m: _JSON_CHARS.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), text)
