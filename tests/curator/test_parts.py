"""Table-driven tests of the curator's parts: rules, the secrets prefilter, MinHash, git reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from academyd.curator import git as gitsrc
from academyd.curator.dedup import Deduper, Signer, normalize
from academyd.curator.rules import commit_message_reason, is_successful_lesson, is_successful_task, trivial_reason
from academyd.curator.examples import Example
from academyd.curator.families import assign_families
from academyd.secrets import scanner as secret_scanner
from fixtures.curator import PRIVATE_KEY, SECRETS, GitRepo, Words, secret_texts


@pytest.mark.parametrize(
    ("result", "metadata", "expected"),
    [
        ("Sukces: zadanie wykonane", {}, True),
        ("SUKCES", {}, True),
        ("all good ✅", {}, True),
        ("Brak sukcesu, timeout", {}, False),
        ("nie było sukcesu", {}, False),
        ("sukces częściowy ❌ test failed", {}, False),
        ("Błąd: timeout", {}, False),
        ("done", {"success": True}, True),
        ("done", {"success": "tak"}, True),
        ("done", {"outcome": "success"}, True),
        ("done", {"success": False}, False),
        ("", None, False),
    ],
)
def test_lesson_success_rule(result: str, metadata: dict | None, expected: bool) -> None:
    assert is_successful_lesson(result, metadata) is expected


@pytest.mark.parametrize(("status", "expected"), [("COMPLETED", True), ("completed ", True), ("DONE", True),
                                                   ("FAILED", False), ("LOST", False), ("", False), (None, False)])
def test_task_success_rule(status: str | None, expected: bool) -> None:
    assert is_successful_task(status) is expected


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("Add retry with backoff to the fetcher", None),
        ("Merge branch 'feature' into main", "message_merge"),
        ("Merge pull request #12 from venom/x", "message_merge"),
        ("WIP planner", "message_wip"),
        ("fixup! Add retry", "message_wip"),
        ("Bump version to 1.2.3", "message_version_bump"),
        ("chore(release): 2.0.0", "message_version_bump"),
        ("v1.4.0", "message_version_bump"),
        ("bump lodash from 4.17.20 to 4.17.21", "message_version_bump"),
        ("https://github.com/venom/venom/pull/42", "message_url_only"),
        ("fix", "message_too_short"),
        ("fix the bug", None),
        ("Add a very long message " + "word " * 300, "message_too_long"),
        ("", "message_empty"),
    ],
)
def test_commit_message_filters(message: str, reason: str | None) -> None:
    assert commit_message_reason(message, min_chars=10, max_chars=1000, min_words=3) == reason


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"a": "A real situation here", "b": "a real action taken"}, None),
        ({"a": "", "b": "x" * 30}, "empty"),
        ({"a": "   ", "b": "x" * 30}, "empty"),
        ({"a": "TODO", "b": "x" * 30}, "placeholder"),
        ({"a": "Lorem ipsum dolor sit amet", "b": "x" * 30}, "placeholder"),
        ({"a": "...", "b": "x" * 30}, "placeholder"),
        ({"a": "Hi", "b": "Go"}, "too_short"),
    ],
)
def test_trivial_content(fields: dict, reason: str | None) -> None:
    assert trivial_reason(fields, 20) == reason


def test_every_planted_secret_kind_is_found_and_redacted() -> None:
    scanner = secret_scanner()
    for kind, text in secret_texts().items():
        cleaned, types, ok = scanner.clean(text)
        assert ok and types, kind
        for value in [*SECRETS.values(), *PRIVATE_KEY.splitlines()[1:-1]]:
            assert value not in cleaned, (kind, value)
    assert scanner.clean("Refactored the planner loop and added tests")[1] == {}


def test_prefilter_never_hides_a_line_the_rules_flag() -> None:
    """The Hyperscan prefilter finds exactly what every rule run on every line finds, and every line
    detect-secrets' own token plugins flag is flagged too (its keyword, entropy and public-IP plugins
    are replaced by rules measured on tests/secrets/corpus.jsonl)."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    w = Words(1)
    lines = [*(t for v in secret_texts().values() for t in v.splitlines())]
    lines += [
        'db_password = "Xk29fLq0pZ"', "api_key: 9f8e7d6c5b4a39281706", "sk_live_" + "a1B2c3D4e5F6g7H8i9J0k1L2",
        "xoxb-123456789012-123456789012-abcdefghijklmnopqrstuvwx", 'secret = "c2VjcmV0LXZhbHVlLWZvci10ZXN0aW5n"',
        "npm_token=npm_" + "a1" * 18, "PASSWORD=hunter2hunter2", "contraseña = Lima2024!",
        "SG." + "a" * 22 + "." + "b" * 43, 'ibm_cloud_iam_api_key = "' + "A1b2" * 11 + '"',
        "softlayer_api_key: " + "a1" * 32, "cloudant_password='" + "x1" * 12 + "'",
        "https://u:" + "ab" * 12 + "@acct.cloudant.com", "Straße mit hasło: Zażółć2024!",
    ]
    lines += [w.sentence(12) for _ in range(200)]
    scanner = secret_scanner()
    texts = ["\n".join(lines), "\n".join([*lines, "Straße"])]
    prefiltered = [sorted((f.type, f.value) for f in x) for x in scanner.find_many(texts)]
    assert prefiltered == [sorted((f.type, f.value) for f in x) for x in scanner.full_scan(texts)]
    flagged = {f.line for f in scanner.find_many(lines) for f in f}
    assert len(flagged) >= 15
    replaced = {"KeywordDetector", "Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector"}
    plugins = [c() for c in get_mapping_from_secret_type_to_class().values() if c.__name__ not in replaced]
    stock = {line for line in lines for p in plugins if list(p.analyze_string(line))}
    assert stock and stock <= flagged
    assert len(flagged) < len(lines) // 2  # and the harmless prose is left alone


def test_our_signatures_are_rensa_minhashes_that_estimate_jaccard() -> None:
    """The batched signatures are rensa's RMinHash digests of each text's shingle hashes, the same for a
    text wherever it sits in a batch, and their agreement rate estimates the exact Jaccard similarity."""
    import rensa

    from academyd.curator.dedup import batch_window_hashes, jaccard, shingle_set

    signer = Signer(64, 5)
    texts = ["hello world, this is the curator", "ab", "zażółć gęślą jaźń ✅", ""]
    sigs = signer.sign([normalize(t) for t in texts])
    for text, sig in zip(texts, sigs, strict=True):
        flat, lengths = batch_window_hashes([normalize(text)], 5)
        alone = rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, np.array([0, len(flat)], dtype=np.uint64),
                                                                     64, 1).to_rows()[0]
        assert list(sig) == alone
        assert np.array_equal(signer.sign([normalize(text)])[0], sig)
    from academyd.curator.dedup import batch_shingle_hashes, shingle_hashes

    norms = [normalize(t) for t in texts]
    flat, lengths = batch_shingle_hashes(norms, 5)
    assert np.array_equal(flat, np.concatenate([shingle_hashes(n, 5) for n in norms]))
    assert lengths.tolist() == [len(shingle_hashes(n, 5)) for n in norms]
    w = Words(9)
    errors = []
    for _ in range(60):
        words = w.sentence(50).split()
        other = list(words)
        for _ in range(w.rng.randint(1, 25)):
            other[w.rng.randrange(len(other))] = w.rng.choice(w.vocab)
        a, b = normalize(" ".join(words)), normalize(" ".join(other))
        sa, sb = signer.sign([a, b])
        errors.append(float(np.mean(sa == sb)) - jaccard(shingle_set(a, 5), shingle_set(b, 5)))
    assert abs(float(np.mean(errors))) < 0.03 and float(np.std(errors)) < 0.09


def test_dedup_is_order_stable_and_exact_about_the_threshold() -> None:
    w = Words(2)
    base = [w.sentence(40) for _ in range(50)]
    words = base[0].split()
    near = " ".join(words[:-2] + ["odmienione", "słowa"])  # a few shingles differ: J >= 0.8
    far = " ".join(words[: len(words) // 2]) + " " + w.sentence(20)  # half shared: J < 0.8
    d = Deduper(threshold=0.8, num_perm=64, k=5)
    first = d.run([f"k{i}" for i in range(50)], base)
    assert all(v.kept for v in first)
    later = d.run(["near", "far", "exact"], [near, far, base[1].upper()])
    assert [(v.reason, v.duplicate_of) for v in later] == [("near_duplicate", "k0"), (None, None), ("exact_duplicate", "k1")]
    assert later[0].similarity >= 0.8


def test_split_remembers_and_stratifies() -> None:
    keys = {"lesson": [f"lesson:{i}" for i in range(200)], "task": [f"task:{i}" for i in range(12)]}

    def assign(keys: dict[str, list[str]], fraction: float, remembered: dict[str, str]) -> tuple[dict, dict]:
        # one family per record: the split of academyd.curator.families at its simplest
        exs = [Example(source=src, key=k, order=("", src, i), instruction="", turns=[("human", k), ("gpt", "x")])
               for src, ks in keys.items() for i, k in enumerate(ks)]
        r = assign_families(exs, {e.key: f"fam-{e.key}" for e in exs}, fraction, remembered, min_families=8)
        return r.split, r.why

    split, why = assign(keys, 0.1, {})
    held = {k for k, s in split.items() if s == "heldout"}
    assert 8 <= sum(k.startswith("lesson") for k in held) <= 35
    assert any(k.startswith("task") for k in held)
    remembered = {k: s for k, s in split.items()}
    again, why2 = assign(keys, 0.01, remembered)
    assert again == split and set(why2.values()) == {"remembered"}


def test_git_reads_in_batches_and_knows_what_exists(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "r")
    a = repo.commit("Add the first module of the agent", {"a.py": "print('a')\n"})
    big = repo.commit("Add a large table for the tokenizer", {"t.txt": "x" * 10_000 + "\n"})
    repo.git("checkout", "-q", "-b", "side")
    s = repo.commit("Add the side module for the agent", {"s.py": "print('s')\n"})
    repo.git("checkout", "-q", "main")
    m = repo.commit("Add the main module for the agent", {"m.py": "print('m')\n"})
    merge = repo.merge("side", "Merge branch 'side'")
    assert gitsrc.commit_available(repo.path, a) and gitsrc.commit_available(repo.path, a[:8])
    assert not gitsrc.commit_available(repo.path, "f" * 40)
    assert not gitsrc.commit_available(tmp_path / "nothing", a)
    with gitsrc.open_repo(repo.path) as r:
        full = gitsrc.existing_commits(r, [a[:10], big, "e" * 40, merge])
        assert full == {a[:10]: a, big: big, merge: merge}
        got = {c.sha: c for c in gitsrc.read_commits(r, [a, big, merge, s, m], cap=3000)}
        history = list(gitsrc.walk_history(r))
    assert got[a].message == "Add the first module of the agent" and "+print('a')" in got[a].diff
    assert got[big].diff_chars > 10_000 and len(got[big].diff) <= 3001
    assert got[merge].is_merge and not got[s].is_merge
    assert [h.sha for h in history][0] == a and len(history) == 5
    with pytest.raises(gitsrc.RepoNotAllowed, match="not in the allowlist"):
        gitsrc.resolve_repo({"venom": repo.path}, "other")


def test_the_scanner_never_verifies_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Verifying a secret would send it to its provider: never from the curator. Nor may the scanner
    depend on detect-secrets' process-wide settings (entered and left by other threads)."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.settings import get_settings

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("a secret was sent for verification")

    for cls in get_mapping_from_secret_type_to_class().values():
        monkeypatch.setattr(cls, "verify", refuse)
    monkeypatch.setattr("detect_secrets.settings.get_settings", refuse)
    for text in secret_texts().values():
        assert secret_scanner().clean(text)[1]
    assert get_settings is not None


def test_near_duplicates_just_over_the_threshold_are_all_caught() -> None:
    from academyd.curator.dedup import jaccard, shingle_set

    w = Words(4)
    pairs = []
    while len(pairs) < 40:
        words = w.sentence(60).split()
        copy = list(words)
        for _ in range(3):
            copy[w.rng.randrange(len(copy))] = w.rng.choice(w.vocab)
        a, b = " ".join(words), " ".join(copy)
        j = jaccard(shingle_set(normalize(a), 5), shingle_set(normalize(b), 5))
        if 0.8 <= j < 0.86:
            pairs.append((a, b))
    d = Deduper(threshold=0.8, num_perm=64, k=5)
    keys = [f"{side}{i}" for i in range(len(pairs)) for side in "ab"]
    verdicts = d.run(keys, [t for pair in pairs for t in pair])
    assert [v.duplicate_of for v in verdicts[1::2]] == [f"a{i}" for i in range(len(pairs))]
