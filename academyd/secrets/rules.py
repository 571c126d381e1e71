"""What a secret looks like: one `Rule` per shape, each a Python regex with a Hyperscan trigger.

A rule's `trigger` is a regex every match of its `pattern` must contain on the same line (a prefix of
the pattern, or its keyword); Hyperscan looks for all triggers at once over a whole batch of text, and
only the lines where one fires are matched with the rule itself. The trigger of a rule taken from
detect-secrets is its own regex, compiled in Hyperscan's prefilter mode (a superset by construction).
A test checks on the corpus that the prefiltered scan finds exactly what the full scan finds.

Rules come in three families:
- token shapes with a fixed prefix (AKIA, ghp_, xoxb-, sk_live_, eyJ, -----BEGIN ... PRIVATE KEY-----),
  flagged wherever they appear;
- credentials inside URLs and connection strings (any printable character in the password, RFC 3986
  sub-delimiters included);
- context rules: a secret-sounding name (password, secret, token, api_key, hasło, ...) assigned or said
  in prose, CLI flags and HTTP headers, where the value is then judged (`looks_secret`) so that
  `password = os.environ["X"]`, `max_tokens: 4096` or "the password field is required" pass.

Every regex is compiled with re.ASCII: Hyperscan folds case in ASCII only, and so the rule must.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

Check = Callable[[str], bool]


@dataclass(frozen=True)
class Rule:
    kind: str
    pattern: re.Pattern[str]
    trigger: str  # Hyperscan expression (ASCII-caseless when `caseless`)
    group: str | int = "s"  # the group holding the secret (0: the whole match)
    check: Check | None = None
    caseless: bool = False
    prefilter: bool = False  # compile the trigger in Hyperscan's prefilter mode (lookarounds, backrefs)
    flags: dict[str, bool] = field(default_factory=dict)


def _re(pattern: str, caseless: bool = False) -> re.Pattern[str]:
    return re.compile(pattern, re.ASCII | re.VERBOSE * 0 | (re.IGNORECASE if caseless else 0))


# ---------------------------------------------------------------- judging a value

_PLACEHOLDER = re.compile(
    r"""^(?:<[^<>]*>|\$\{?[\w.:-]*\}?|\{\{.*\}\}|%\(?\w*\)?s?|%\w+%|\*+|x{3,}|\.{3,}|_+|-+|\?+|#+
        |(?:your|my|the|some|example|sample|dummy|fake|test|placeholder|insert|enter|put)[-_ ]?\w*
        |\w*(?:here|example|placeholder|changeme|redacted|secret|password|passwd|token|value)
        |none|null|nil|true|false|undefined|empty|required|optional|hidden|masked|n/?a|tbd|todo)$""",
    re.IGNORECASE | re.VERBOSE,
)
_CODE = re.compile(
    r"""^(?:[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+(?:\(.*\)?)?   # attribute access, a method call
        |[A-Za-z_][\w.]*[(\[].*                             # a call, a subscript
        |(?:os\.|process\.env|ENV\[|env\(|getenv|secrets\.|vault:|ssm:|arn:aws:|ref\+|!Ref|!Sub|\$\(|`).*
        |(?:~|\.{1,2})?/[\w./-]*                             # a path
        |[A-Za-z]:\\[\w\\. -]*)$""",
    re.VERBOSE,
)
_TRAILING = ".,;:)]}>\"'`!?"


def entropy(s: str) -> float:
    if not s:
        return 0.0
    counts: dict[str, int] = {}
    for ch in s:
        counts[ch] = counts.get(ch, 0) + 1
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _classes(s: str) -> int:
    return sum((any(c.islower() for c in s), any(c.isupper() for c in s), any(c.isdigit() for c in s),
                any(not c.isalnum() for c in s)))


def _plain(value: str) -> str:
    return value.strip().strip(_TRAILING).strip()


def looks_secret(value: str, *, min_len: int = 8) -> bool:
    """A value said or assigned under a secret-sounding name, judged: a password or key, or not?

    Not: placeholders and templates (`<password>`, `${DB_PASS}`, `{{ secrets.X }}`, `***`, `changeme`),
    code (`os.environ["X"]`, `get_token()`, `settings.SECRET_KEY`, a path), numbers, booleans, and
    plain words or identifiers (`required`, `user_password_field`). Yes: anything else of `min_len`
    characters mixing at least two of lower case, upper case, digits and symbols.
    """
    v = _plain(value)
    if len(v) < min_len or _PLACEHOLDER.match(v) or _CODE.match(v):
        return False
    if "REDACTED" in v:
        return False
    if re.fullmatch(r"[\d.,:_ -]+", v):  # numbers, sizes, times, versions
        return False
    if re.fullmatch(r"v?\d+(?:\.\d+)+(?:[-+.][\w.]+)?", v):  # a version string
        return False
    if re.fullmatch(r"[A-Za-z]+(?:[_.-][A-Za-z]+)*", v):
        return False  # a word or an identifier (letters only: a password without a digit or symbol is rare)
    return _classes(v) >= 2


def looks_key(value: str) -> bool:
    """A value under a weak name (`..._key`): only a long, random-looking string is a secret."""
    v = _plain(value)
    if not looks_secret(v, min_len=16):
        return False
    if re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", v, re.IGNORECASE):
        return False  # a UUID names something; it does not unlock it
    return entropy(v) >= 3.3 and _classes(v) >= 2 and sum(c.isdigit() for c in v) >= 2


def _token(value: str) -> bool:
    """A prefixed token: not a placeholder run (`ghp_xxxx...`)."""
    body = _plain(value)
    return entropy(body) >= 2.5 and "REDACTED" not in body


def _mixed(value: str) -> bool:
    v = _plain(value)
    return _token(v) and any(c.isdigit() for c in v) and any(c.isupper() for c in v) and any(c.islower() for c in v)


def _password(value: str) -> bool:
    return looks_secret(value, min_len=6)


def _url_password(value: str) -> bool:
    v = value
    return bool(v) and not _PLACEHOLDER.match(v) and "REDACTED" not in v \
        and v.lower() not in {"password", "pass", "secret", "pwd"}


# ---------------------------------------------------------------- the rules

# Boundaries: a token does not start or end in the middle of a longer run of token characters.
_L = r"(?<![A-Za-z0-9_-])"
_R = r"(?![A-Za-z0-9_-])"
# Names that make the value beside them a secret (strong) ...
_STRONG = (r"pass(?:word|wd|phrase|code)?|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|"
           r"priv(?:ate)?[_-]?key|signing[_-]?key|encryption[_-]?key|master[_-]?key|session[_-]?key|"
           r"auth[_-]?key|credentials?|client[_-]?secret|has(?:\xc5\x82|\xc5\x81|l)o|contrase(?:\xc3\xb1|\xc3\x91|n)a|passwort")
_STRONG_PY = (r"pass(?:word|wd|phrase|code)?|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|"
              r"priv(?:ate)?[_-]?key|signing[_-]?key|encryption[_-]?key|master[_-]?key|session[_-]?key|"
              r"auth[_-]?key|credentials?|client[_-]?secret|has(?:ł|Ł|l)o|contrase(?:ñ|Ñ|n)a|passwort")
_ASSIGN = r"""["']?\]?[ \t]*(?::=|=>|==?|:|\s=\s)[ \t]*"""
_VALUE = r"""(?:"(?P<dq>(?:[^"\\\n]|\\.)+)"|'(?P<sq>[^'\n]+)'|`(?P<bq>[^`\n]+)`|(?P<s>[^\s"'`,;]+))"""


def _assignment_value(m: re.Match[str]) -> str:
    groups = m.groupdict()
    return next(groups[g] for g in ("dq", "sq", "bq", "s") if groups.get(g) is not None)


TOKEN_RULES: list[Rule] = [
    Rule("AWS Access Key", _re(_L + r"(?P<s>(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16})" + _R),
         r"A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA", check=_token),
    Rule("AWS Secret Key", _re(r"aws[\w.-]{0,30}?(?:secret|sk)[\w.-]{0,20}(?:" + _ASSIGN + r"|\s+)"
                               + r"""["']?(?P<s>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])""", True),
         r"aws[A-Za-z0-9_.-]{0,30}(?:secret|sk)", caseless=True),
    Rule("Google API Key", _re(_L + r"(?P<s>AIza[0-9A-Za-z_-]{35})" + _R), r"AIza"),
    Rule("Google OAuth Secret", _re(_L + r"(?P<s>GOCSPX-[0-9A-Za-z_-]{28})" + _R), r"GOCSPX-"),
    Rule("Google OAuth Token", _re(_L + r"(?P<s>ya29\.[0-9A-Za-z_-]{30,})"), r"ya29\."),
    Rule("Azure Storage Key", _re(r"AccountKey\s*=\s*(?P<s>[A-Za-z0-9+/]{40,}={0,2})", True), r"accountkey",
         caseless=True),
    Rule("Azure SAS Signature", _re(r"[?&]sig=(?P<s>[A-Za-z0-9%+/=]{20,})"), r"[?&]sig="),
    Rule("Azure Client Secret", _re(_L + r"(?P<s>[A-Za-z0-9_~.-]{3}[78]Q~[A-Za-z0-9_~.-]{31,34})" + _R), r"[78]Q~"),
    Rule("GitHub Token", _re(_L + r"(?P<s>gh[pousr]_[A-Za-z0-9]{36,255})" + _R), r"gh[pousr]_", check=_token),
    Rule("GitHub Token", _re(_L + r"(?P<s>github_pat_[A-Za-z0-9_]{50,255})" + _R), r"github_pat_", check=_token),
    Rule("GitLab Token", _re(_L + r"(?P<s>gl(?:pat|dt|cbt|ptt|rt|soat|ft|imt|agent|oas|ffct)-[A-Za-z0-9_-]{20,})"),
         r"gl(?:pat|dt|cbt|ptt|rt|soat|ft|imt|agent|oas|ffct)-", check=_token),
    Rule("GitLab Token", _re(_L + r"(?P<s>GR1348941[A-Za-z0-9_-]{20,})"), r"GR1348941", check=_token),
    Rule("npm Token", _re(_L + r"(?P<s>npm_[A-Za-z0-9]{36})" + _R), r"npm_", check=_mixed),
    Rule("PyPI Token", _re(_L + r"(?P<s>pypi-AgE[A-Za-z0-9_-]{50,})"), r"pypi-AgE"),
    Rule("CircleCI Token", _re(_L + r"(?P<s>CCIPAT_[A-Za-z0-9]{22}_[a-f0-9]{40})"), r"CCIPAT_"),
    Rule("Buildkite Token", _re(_L + r"(?P<s>bkua_[a-f0-9]{40})" + _R), r"bkua_"),
    Rule("Docker Hub Token", _re(_L + r"(?P<s>dckr_pat_[A-Za-z0-9_-]{27,})"), r"dckr_pat_"),
    Rule("Hugging Face Token", _re(_L + r"(?P<s>hf_[A-Za-z]{34,})" + _R), r"hf_", check=_token),
    Rule("Vault Token", _re(_L + r"(?P<s>hv[sb]\.[A-Za-z0-9_-]{24,})"), r"hv[sb]\."),
    Rule("Slack Token", _re(_L + r"(?P<s>xox[abposre]-[0-9A-Za-z-]{10,})"), r"xox[abposre]-", check=_token),
    Rule("Slack Token", _re(_L + r"(?P<s>xapp-\d-[A-Z0-9]+-\d+-[a-f0-9]{20,})"), r"xapp-"),
    Rule("Slack Webhook", _re(r"(?P<s>hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_-]{20,})"),
         r"hooks\.slack\.com/"),
    Rule("Discord Webhook", _re(r"discord(?:app)?\.com/api/webhooks/\d+/(?P<s>[A-Za-z0-9_-]{30,})"), r"/api/webhooks/"),
    Rule("Discord Bot Token", _re(_L + r"(?P<s>[MNO][A-Za-z0-9_-]{23,25}\.[A-Za-z0-9_-]{6}\.[A-Za-z0-9_-]{27,40})" + _R),
         r"[MNO][A-Za-z0-9_-]{23,25}\.[A-Za-z0-9_-]{6}\.", check=_mixed),
    Rule("Telegram Bot Token", _re(r"(?<![0-9])(?P<s>\d{8,10}:AA[0-9A-Za-z_-]{33})" + _R), r"[0-9]{8}:AA"),
    Rule("Stripe Key", _re(_L + r"(?P<s>(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{24,247})" + _R), r"[sr]k_(?:live|test)_"),
    Rule("Stripe Webhook Secret", _re(_L + r"(?P<s>whsec_[A-Za-z0-9]{32,})"), r"whsec_"),
    Rule("API Key (sk-)", _re(_L + r"(?P<s>sk-(?:proj-|svcacct-|admin-|ant-(?:api|admin)\d\d-)?[A-Za-z0-9_-]{32,})"),
         r"sk-", check=_mixed),
    Rule("SendGrid Key", _re(_L + r"(?P<s>SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43})"), r"SG\."),
    Rule("Shopify Token", _re(_L + r"(?P<s>shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32})"), r"shp(?:at|ca|pa|ss)_"),
    Rule("JSON Web Token", _re(_L + r"(?P<s>eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*)"), r"eyJ"),
    Rule("Private Key", _re(r"(?P<s>-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----)"), r"PRIVATE KEY", group=0),
    Rule("Private Key", _re(r"(?P<s>PuTTY-User-Key-File-\d)"), r"PuTTY-User-Key-File", group=0),
]

URL_RULES: list[Rule] = [
    # scheme://user:password@host: the password is everything up to the last "@" before a host, so a
    # raw "@", "/", ":" or any sub-delimiter (!$&'()*+,;=) in it is still taken whole.
    Rule("URL Credentials",
         _re(r"[A-Za-z][A-Za-z0-9+.-]{0,30}://(?P<u>[^\s:/@]*):(?P<s>\S+)@(?=[A-Za-z0-9\[][A-Za-z0-9.\[\]:_-]*"
             r"(?:[/?#\s\"'`<>)\],;]|$))"),
         r"://[^ \t\r\n/@]*:[^ \t\r\n]*@", check=_url_password),
    # ADO.NET / ODBC / libpq key=value strings: Password=...; (quoted, braced or up to the ";")
    Rule("Connection String Password",
         _re(r"""(?:^|[;\s"'{(])(?:password|pwd|passwd|pass)\s*=\s*"""
             r"""(?:'(?P<q1>(?:[^']|'')+)'|"(?P<q2>(?:[^"]|"")+)"|\{(?P<q3>(?:[^}]|\}\})+)\}|(?P<s>[^;\r\n]+?))"""
             r"""\s*(?=;|$|["'])""", True),
         r"(?:password|pwd|passwd|pass)[ \t]*=", caseless=True, check=_password),
    Rule("URL Query Secret",
         _re(r"[?&](?:password|passwd|pwd|pass|secret|token|access_token|api_key|apikey|key|client_secret"
             r"|auth|signature)=(?P<s>[^&\s#\"'<>]{6,})", True),
         r"[?&](?:password|passwd|pwd|pass|secret|token|access_token|api_key|apikey|key|client_secret|auth"
         r"|signature)=", caseless=True, check=_url_password),
]

CONTEXT_RULES: list[Rule] = [
    # name = value, name: value, "name": "value", name := value, :name => value, NAME=value (.env)
    Rule("Secret Assignment",
         _re(r"(?P<n>[A-Za-z0-9_.-]*(?:" + _STRONG_PY + r")[A-Za-z0-9_.-]*)" + _ASSIGN + _VALUE, True),
         r"(?:" + _STRONG + r")[A-Za-z0-9_.-]*[\"']?\]?[ \t]*[:=]", caseless=True, group="value",
         check=_password),
    # ..._key = value (weak name: only a long random value counts)
    Rule("Key Assignment",
         _re(r"(?P<n>[A-Za-z0-9_.-]*key[A-Za-z0-9_.-]*)" + _ASSIGN + _VALUE, True),
         r"key[A-Za-z0-9_.-]*[\"']?\]?[ \t]*[:=]", caseless=True, group="value", check=looks_key),
    # <password>value</password>, <add key="ApiKey" value="..."/>
    Rule("Secret in XML",
         _re(r"<(?P<n>[\w:-]*(?:" + _STRONG_PY + r")[\w:-]*)>(?P<s>[^<\n]+)</", True),
         r"(?:" + _STRONG + r")[A-Za-z0-9_:-]*>", caseless=True, check=_password),
    Rule("Secret in XML",
         _re(r"""key\s*=\s*["'][\w.:-]*(?:""" + _STRONG_PY + r""")[\w.:-]*["']\s+value\s*=\s*["'](?P<s>[^"'\n]+)""",
             True),
         r"key[ \t]*=[ \t]*[\"'][A-Za-z0-9_.:-]*(?:" + _STRONG + r")", caseless=True, check=_password),
    # prose: "the password for the staging db is X", "hasło do bazy to X", "password: X"
    Rule("Password in Prose",
         _re(r"\b(?:pass(?:word|wd|phrase|code)|pwd|has(?:ł|Ł|l)o|contrase(?:ñ|Ñ|n)a|passwort)\b"
             r"(?:[ \t]+(?!is\b|was\b|to\b|jest\b|=)[^\s]+){0,5}?"
             r"[ \t]*(?:\bis\b|\bwas\b|\bto\b|\bjest\b|\bbecomes\b|\bset to\b|\bchanged to\b|\breset to\b|[:=]|->|\u2192)"
             r"""[ \t]*(?::[ \t]*)?[`"'\u201c\u201e(]?(?P<s>[^\s`"'\u201d]{6,})""", True),
         r"\b(?:pass(?:word|wd|phrase|code)|pwd|has(?:\xc5\x82|\xc5\x81|l)o|contrase(?:\xc3\xb1|\xc3\x91|n)a|passwort)",
         caseless=True, check=_password),
    # "login admin / S3cr3t!", "credentials admin:hunter2!" (user:password after a credentials word)
    Rule("Credentials Pair",
         _re(r"\b(?:credentials?|creds|login)\b[ \t]*(?:are|is|:|=)?[ \t]*[\"'`]?[\w.@+-]+(?:[ \t]*/[ \t]*|:)"
             r"(?P<s>[^\s\"'`]{6,})", True),
         r"\b(?:credentials?|creds|login)\b", caseless=True, check=_password),
    # CLI flags: --password=X, --password X, --token 'X', -p X after sshpass/docker login, mysql -pX
    Rule("Secret CLI Flag",
         _re(r"(?:^|\s)--?(?:[\w-]*(?:pass(?:word|wd|phrase)?|pwd|token|secret|api-?key|apikey|access-key"
             r"|auth|credentials?|private-key)[\w-]*)(?:=|[ \t]+)(?:\"(?P<dq>(?:[^\"\\\n]|\\.)+)\"|'(?P<sq>[^'\n]+)'"
             r"|(?P<s>[^\s\"']+))", True),
         r"--?[A-Za-z0-9_-]*(?:pass|pwd|token|secret|api-?key|apikey|access-key|auth|credential|private-key)",
         caseless=True, group="value", check=_password),
    Rule("Secret CLI Flag",
         _re(r"\b(?:mysql|mysqldump|mysqladmin|mariadb)\b[^\n]*?\s-p(?P<s>[^\s-][^\s]{5,})", True),
         r"\b(?:mysql|mysqldump|mysqladmin|mariadb)\b", caseless=True, check=_password),
    Rule("Secret CLI Flag",
         _re(r"\b(?:sshpass|docker|podman|helm|login)\b[^\n]*?\s-p[ \t]+[\"']?(?P<s>[^\s\"']{6,})", True),
         r"\b(?:sshpass|docker|podman|helm|login)\b", caseless=True, check=_password),
    Rule("Secret CLI Flag",
         _re(r"\b(?:curl|wget|http)\b[^\n]*?\s(?:-u|--user)[ \t]+[\"']?[^\s:\"']+:(?P<s>[^\s\"']{4,})", True),
         r"\b(?:curl|wget|http)\b", caseless=True, check=_url_password),
    # HTTP: Authorization: Bearer|Basic|token|Bot X, X-Api-Key: X, Private-Token: X, and "Bearer X" anywhere
    Rule("HTTP Authorization",
         _re(r"""\b(?:proxy-)?authorization\b["']?\s*[:=]\s*["']?(?:(?:bearer|basic|token|bot|digest|apikey"""
             r"""|api-key|sso-key|key|hmac|aws4-hmac-sha256|gensecauth)\s+)?(?P<s>[A-Za-z0-9._~+/=:,-]{8,})""", True),
         r"authorization", caseless=True, check=_password),
    Rule("HTTP Authorization",
         _re(r"""\b(?:x-[\w-]*(?:key|token|secret|auth)[\w-]*|api-key|apikey|private-token|x-vault-token"""
             r"""|x-gitlab-token|ocp-apim-subscription-key)["']?\s*:\s*["']?(?P<s>[A-Za-z0-9._~+/=:-]{8,})""", True),
         r"(?:x-[A-Za-z0-9_-]*(?:key|token|secret|auth)|api-?key|private-token|subscription-key)[A-Za-z0-9_-]*[\"']?[ \t]*:",
         caseless=True, check=_password),
    Rule("HTTP Authorization",
         _re(r"\b(?:bearer|basic)[ \t]+(?P<s>[A-Za-z0-9._~+/-]{16,}=*)", True), r"(?:bearer|basic)[ \t]",
         caseless=True, check=_password),
    Rule("HTTP Authorization",
         _re(r"\b(?:cookie|set-cookie)\s*:\s*[^\n]*?\b(?:session|sess|sid|token|auth)[\w-]*=(?P<s>[^;\s\"']{12,})",
             True),
         r"cookie[ \t]*:", caseless=True, check=_password),
]

RULES: list[Rule] = TOKEN_RULES + URL_RULES + CONTEXT_RULES


def secret_of(rule: Rule, m: re.Match[str]) -> str:
    """The secret a match of `rule` holds (what redaction removes)."""
    if rule.group == "value":
        return _assignment_value(m)
    if rule.kind == "Connection String Password":
        return next(g for g in (m.group("q1"), m.group("q2"), m.group("q3"), m.group("s")) if g is not None)
    return m.group(rule.group)
