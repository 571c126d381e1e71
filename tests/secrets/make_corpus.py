"""Generate the secret-scanner corpus: realistic secrets in natural text and code, and hard negatives.

    .venv/bin/python tests/secrets/make_corpus.py        # rewrites tests/secrets/corpus.jsonl

Every secret is fake but well-formed (the right prefix, alphabet and length for its kind; nothing real),
drawn from a seeded generator, so the file is the same on every run (a test holds it so). Each line:
`{"label": "secret"|"negative", "kind": ..., "text": ..., "secrets": [...]}`; a secret line lists the
values that must not survive redaction, exactly as they appear in the text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import string
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

SEED = 20261201
OUT = Path(__file__).with_name("corpus.jsonl")
UP, LO, DG = string.ascii_uppercase, string.ascii_lowercase, string.digits
ALNUM = UP + LO + DG
B64 = ALNUM + "+/"
URLSAFE = ALNUM + "-_"
HEX = "0123456789abcdef"
SUB_DELIMS = "!$&'()*+,;="
PRINTABLE = string.ascii_letters + string.digits + string.punctuation
WORDS = ("the agent retried the planner after the cache timed out and the deploy script finally passed on "
         "staging while the reviewer asked for a smaller diff and better logging around the queue worker").split()


class Gen:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def s(self, alphabet: str, n: int) -> str:
        while True:
            out = "".join(self.r.choice(alphabet) for _ in range(n))
            # a real key mixes its classes; so do ours (an all-letters draw would be a word, not a key)
            if n < 8 or alphabet in (HEX, DG) or (any(c.isdigit() for c in out) and any(c.isalpha() for c in out)):
                return out

    def pick(self, seq: list[str] | tuple[str, ...]) -> str:
        return self.r.choice(seq)

    def words(self, n: int) -> str:
        return " ".join(self.r.choice(WORDS) for _ in range(n))

    def password(self, alphabet: str = PRINTABLE, n: tuple[int, int] = (10, 20)) -> str:
        while True:
            p = "".join(self.r.choice(alphabet) for _ in range(self.r.randint(*n)))
            if (any(c.isupper() for c in p) and any(c.islower() for c in p) and any(c.isdigit() for c in p)
                    and p.strip() == p):
                return p

    def b64url(self, obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode().rstrip("=")


def positives(g: Gen) -> list[dict]:
    out: list[dict] = []

    def add(kind: str, make: Callable[[], tuple[str, list[str]]], n: int = 10) -> None:
        for _ in range(n):
            text, secrets = make()
            out.append({"label": "secret", "kind": kind, "text": text, "secrets": secrets})

    def ctx(secret_line: str) -> str:
        """A secret line inside a little natural text (before, after, or both)."""
        shape = g.r.randrange(4)
        if shape == 0:
            return secret_line
        if shape == 1:
            return f"{g.words(8).capitalize()}:\n{secret_line}\n{g.words(6)}."
        if shape == 2:
            return f"{g.words(6).capitalize()} {secret_line} {g.words(5)}."
        return f"```\n{secret_line}\n```\n{g.words(9).capitalize()}."

    def aws_id() -> str:
        return g.pick(["AKIA", "ASIA"]) + g.s(UP + "234567", 16)

    def aws_key():
        k = aws_id()
        t = g.pick([f"export AWS_ACCESS_KEY_ID={k}", f"aws_access_key_id = {k}", f'"AccessKeyId": "{k}"',
                    f"The IAM user was created with access key {k} yesterday", f"AWS_ACCESS_KEY_ID: {k}"])
        return ctx(t), [k]

    def aws_secret():
        k = g.s(B64, 40)
        t = g.pick([f"aws_secret_access_key = {k}", f"export AWS_SECRET_ACCESS_KEY={k}",
                    f'"SecretAccessKey": "{k}"', f"AWS_SECRET_ACCESS_KEY: '{k}'",
                    f"aws configure set aws_secret_access_key {k}"])
        return ctx(t), [k]

    def gcp_key():
        k = "AIza" + g.s(URLSAFE, 35)
        t = g.pick([f"GOOGLE_API_KEY={k}", f"https://maps.googleapis.com/maps/api/geocode/json?address=x&key={k}",
                    f'const firebaseConfig = {{ apiKey: "{k}", projectId: "venom-dev" }};',
                    f"I used the key {k} for the geocoding call", f"gemini_api_key: {k}"])
        return ctx(t), [k]

    def gcp_sa():
        body = g.s(B64, 64)
        pem = f"-----BEGIN PRIVATE KEY-----\\n{body}\\n{g.s(B64, 64)}\\n-----END PRIVATE KEY-----\\n"
        kid = g.s(HEX, 40)
        t = json.dumps({"type": "service_account", "project_id": "venom-ml", "private_key_id": kid,
                        "private_key": "PEMHERE", "client_email": "trainer@venom-ml.iam.gserviceaccount.com"})
        t = t.replace("PEMHERE", pem)
        return ctx(t), [body, kid]

    def azure():
        k = g.s(B64, 86) + "=="
        sig = quote(g.s(B64, 43) + "=", safe="")
        t = g.pick([
            f"DefaultEndpointsProtocol=https;AccountName=venomdata;AccountKey={k};EndpointSuffix=core.windows.net",
            f'AZURE_STORAGE_CONNECTION_STRING="DefaultEndpointsProtocol=https;AccountName=venom;AccountKey={k}"',
            f"https://venom.blob.core.windows.net/models/a.bin?sv=2022-11-02&ss=b&srt=o&sp=r&se=2027-01-01&sig={sig}",
        ])
        return ctx(t), [sig if "sig=" in t else k]

    def azure_client():
        k = g.s(ALNUM, 3) + g.pick(["8Q~", "7Q~"]) + g.s(ALNUM + "_~.-", 34)
        t = g.pick([f"AZURE_CLIENT_SECRET={k}", f'"clientSecret": "{k}"', f"client secret for the app is {k}"])
        return ctx(t), [k]

    def github():
        k = g.pick(["ghp_", "gho_", "ghs_", "ghu_"]) + g.s(ALNUM, 36)
        if g.r.random() < 0.3:
            k = "github_pat_" + g.s(ALNUM, 22) + "_" + g.s(ALNUM, 59)
        t = g.pick([f"git clone https://x-access-token:{k}@github.com/venom/venom.git",
                    f"GITHUB_TOKEN={k}", f"Configured the runner with token {k} for the release workflow",
                    f"gh auth login --with-token <<< {k}", f"  github_token: {k}"])
        return ctx(t), [k]

    def gitlab():
        k = g.pick(["glpat-", "gldt-", "glrt-", "glcbt-"]) + g.s(URLSAFE, 20)
        t = g.pick([f'curl --header "PRIVATE-TOKEN: {k}" https://gitlab.example.com/api/v4/projects',
                    f"CI_JOB_TOKEN override: {k}", f"gitlab-runner register --token {k}",
                    f"the deploy token is {k}"])
        return ctx(t), [k]

    def ci_token():
        kind = g.r.randrange(4)
        if kind == 0:
            k = "npm_" + g.s(ALNUM, 36)
            t = g.pick([f"//registry.npmjs.org/:_authToken={k}", f"NPM_TOKEN={k}", f"npm token {k} was rotated"])
        elif kind == 1:
            k = "pypi-AgEIcHlwaS5vcmc" + g.s(URLSAFE, 70)
            t = g.pick([f"password = {k}", f"TWINE_PASSWORD={k}", f"twine upload -u __token__ -p {k} dist/*"])
        elif kind == 2:
            k = "CCIPAT_" + g.s(ALNUM, 22) + "_" + g.s(HEX, 40)
            t = g.pick([f"CIRCLE_TOKEN={k}", f"circleci setup --token {k}"])
        else:
            k = "dckr_pat_" + g.s(URLSAFE, 27)
            t = g.pick([f"echo {k} | docker login -u venom --password-stdin", f"DOCKERHUB_TOKEN: {k}"])
        return ctx(t), [k]

    def slack_token():
        k = g.pick(["xoxb-", "xoxp-"]) + g.s(DG, 12) + "-" + g.s(DG, 13) + "-" + g.s(ALNUM, 24)
        t = g.pick([f"SLACK_BOT_TOKEN={k}", f"slack_token: {k}", f"The bot posts with {k} to #alerts",
                    f'client = WebClient(token="{k}")'])
        return ctx(t), [k]

    def slack_hook():
        path = f"T{g.s(UP + DG, 9)}/B{g.s(UP + DG, 11)}/{g.s(ALNUM, 24)}"
        k = f"https://hooks.slack.com/services/{path}"
        t = g.pick([f"SLACK_WEBHOOK_URL={k}", f"curl -X POST -d '{{\"text\":\"done\"}}' {k}",
                    f"notifications go to {k} now"])
        return ctx(t), [path.split("/")[-1]]

    def discord_hook():
        tok = g.s(URLSAFE, 68)
        k = f"https://discord.com/api/webhooks/{g.s(DG, 18)}/{tok}"
        t = g.pick([f"DISCORD_WEBHOOK={k}", f"webhook_url: {k}", f"The alert hook is {k} (do not share)"])
        return ctx(t), [tok]

    def discord_bot():
        k = g.pick("MNO") + g.s(ALNUM, 25) + "." + g.s(URLSAFE, 6) + "." + g.s(URLSAFE, 38)
        t = g.pick([f"DISCORD_BOT_TOKEN={k}", f'bot.run("{k}")', f"discord token: {k}"])
        return ctx(t), [k]

    def telegram():
        k = g.s(DG, 10) + ":AA" + g.s(URLSAFE, 33)
        t = g.pick([f"TELEGRAM_BOT_TOKEN={k}", f"https://api.telegram.org/bot{k}/sendMessage?chat_id=1",
                    f"the bot token from BotFather is {k}"])
        return ctx(t), [k]

    def stripe():
        k = g.pick(["sk_live_", "rk_live_", "sk_test_"]) + g.s(ALNUM, g.pick([24, 99]))
        t = g.pick([f"STRIPE_SECRET_KEY={k}", f"stripe.api_key = '{k}'", f"curl https://api.stripe.com/v1/charges -u {k}:",
                    f"Use {k} for the billing tests"])
        return ctx(t), [k]

    def openai():
        k = g.pick(["sk-proj-" + g.s(URLSAFE, 120), "sk-" + g.s(ALNUM, 20) + "T3BlbkFJ" + g.s(ALNUM, 20),
                    "sk-svcacct-" + g.s(URLSAFE, 100)])
        t = g.pick([f"OPENAI_API_KEY={k}", f'client = OpenAI(api_key="{k}")', f"the judge calls GPT with {k}",
                    f"openai:\n  api_key: {k}"])
        return ctx(t), [k]

    def anthropic():
        k = "sk-ant-api03-" + g.s(URLSAFE, 93) + "AA"
        t = g.pick([f"ANTHROPIC_API_KEY={k}", f'headers = {{"x-api-key": "{k}"}}', f"I switched the eval to {k}",
                    f'anthropic.Anthropic(api_key="{k}")'])
        return ctx(t), [k]

    def jwt():
        k = (g.b64url({"alg": g.pick(["HS256", "RS256"]), "typ": "JWT"}) + "."
             + g.b64url({"sub": g.s(LO, 6), "iat": g.r.randint(1_600_000_000, 1_800_000_000), "admin": True}) + "."
             + g.s(URLSAFE, 43))
        t = g.pick([f"Authorization: Bearer {k}", f"token={k}", f"The session cookie was {k}",
                    f'{{"access_token": "{k}", "token_type": "Bearer"}}'])
        return ctx(t), [k]

    def pem():
        kind = g.pick(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"])
        lines = [g.s(B64, 64) for _ in range(g.r.randint(3, 6))]
        block = f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----"
        t = g.pick([f"Loaded the deploy key from the vault:\n{block}\nand restarted the agent",
                    f"cat > ~/.ssh/id_deploy <<EOF\n{block}\nEOF", block])
        return t, lines

    def url_creds():
        raw = g.password(ALNUM + SUB_DELIMS + "-._~:", (10, 22))
        form = g.r.randrange(3)
        if form == 0:
            pw = raw  # sub-delimiters and ":" are allowed raw in userinfo (RFC 3986)
        elif form == 1:
            pw = quote(g.password(PRINTABLE, (10, 22)), safe="")  # any printable, percent-encoded
        else:
            pw = g.password(ALNUM + SUB_DELIMS + "@/#?", (10, 20))  # raw gen-delims, as people do write them
        user = g.pick(["deploy", "venom", "app_rw", "postgres", "admin"])
        host = g.pick(["db.internal", "10.0.3.7:5432", "git.example.com", "cache.venom.local:6379", "mq:5672"])
        scheme = g.pick(["postgresql", "mysql", "mongodb+srv", "redis", "amqp", "https", "ftp"])
        u = f"{scheme}://{user}:{pw}@{host}/{g.pick(['venom', 'app', 'repo.git', '0'])}"
        t = g.pick([f"DATABASE_URL={u}", f"Cloned {u} into the cache", f'url: "{u}"', f"connecting to {u} failed"])
        return ctx(t), [pw]

    def conn_string():
        pw = g.password(PRINTABLE.replace('"', "").replace("'", "").replace("{", "").replace("}", ""), (10, 18))
        form = g.r.randrange(4)
        if form == 0:
            t = f"Server=tcp:venom.database.windows.net,1433;Database=lessons;User ID=venom;Password={{{pw}}};Encrypt=true;"
        elif form == 1:
            t = f'Data Source=db01;Initial Catalog=academy;User Id=sa;Password="{pw}";'
        elif form == 2:
            pw = g.password(ALNUM + "!#%*+-.:=?^_~", (10, 18))
            t = f"host=db.internal port=5432 dbname=venom user=academy password={pw} sslmode=require"
        else:
            pw = g.password(ALNUM + "!#$%*+-.:_~", (10, 18))
            t = f"jdbc:mysql://db.internal:3306/venom?user=academy&password={pw}&useSSL=true"
        return ctx(t), [pw]

    def prose():
        pw = g.password(ALNUM + "!#$%&*+-.?@^_~", (8, 16))
        t = g.pick([f"My password is {pw} if you need to log in.", f"the password for the staging db is {pw}",
                    f"Hasło do bazy to {pw}", f"hasło: {pw}", f"I reset the admin password to {pw} this morning",
                    f"Password: {pw}", f"login admin / {pw}", f"the wifi passphrase was {pw}, changed since",
                    f"use pwd {pw}? no, pwd is {pw}"])
        return t, [pw]

    def key_value():
        pw = g.password(ALNUM + "!#$%&*+-.?@^_~", (10, 20))
        name = g.pick(["password", "db_password", "DB_PASS", "secret", "client_secret", "api_key", "apiKey",
                       "SECRET_KEY", "auth_token", "access_token", "smtp_password"])
        t = g.pick([f"{name}={pw}", f'{name} = "{pw}"', f'"{name}": "{pw}"', f"{name}: {pw}", f"  {name}: '{pw}'",
                    f"export {name.upper()}={pw}", f"<{name}>{pw}</{name}>", f"{name} := \"{pw}\"",
                    f"config['{name}'] = '{pw}'", f":{name} => '{pw}'"])
        return ctx(t), [pw]

    def cli():
        pw = g.password(ALNUM + "!#%*+-.?@^_~", (10, 18))
        t = g.pick([f"mysql -u root -p{pw} venom", f"psql --password={pw} -h db venom",
                    f"./academyd run --token {pw}", f"sshpass -p '{pw}' ssh deploy@10.0.0.5",
                    f"docker login -u venom -p {pw} registry.local", f"vault login --password=\"{pw}\"",
                    f"curl -u admin:{pw} http://localhost:8080/api", f"tool --api-key {pw} --verbose"])
        return ctx(t), [pw]

    def http():
        tok = g.s(URLSAFE + ".~", g.r.randint(24, 48))
        basic = base64.b64encode(f"admin:{g.password(ALNUM + '!#%', (10, 14))}".encode()).decode()
        t, s = g.pick([(f"Authorization: Bearer {tok}", tok), (f"Authorization: Basic {basic}", basic),
                       (f"curl -H 'Authorization: token {tok}' https://api.example.com", tok),
                       (f"X-Api-Key: {tok}", tok), (f'-H "X-Auth-Token: {tok}"', tok),
                       (f"Cookie: theme=dark; sessionid={tok}", tok),
                       (f'requests.get(url, headers={{"Authorization": "Bearer {tok}"}})', tok)])
        return ctx(t), [s]

    def quoted_entropy():
        k = g.s(g.pick([B64, ALNUM, HEX + "ABCDEF"]), g.r.randint(24, 48))
        name = g.pick(["SIGNING_KEY", "encryptionKey", "hmac_secret", "JWT_SECRET", "master_key", "license_key",
                       "webhookSecret", "privateKey", "appSecret", "fernet_key"])
        t = g.pick([f'{name} = "{k}"', f"const {name} = '{k}';", f'String {name} = "{k}";', f'{name}: "{k}"',
                    f'"{name}": "{k}",', f"{name} := \"{k}\""])
        return ctx(t), [k]

    def unquoted_entropy():
        k = g.s(g.pick([B64, ALNUM, URLSAFE]), g.r.randint(24, 48))
        name = g.pick(["SIGNING_KEY", "encryption_key", "hmac_secret", "JWT_SECRET", "MASTER_KEY", "session_key",
                       "webhook_secret", "API_SECRET", "secret_key_base", "COOKIE_SECRET"])
        t = g.pick([f"{name}={k}", f"{name}: {k}", f"  {name}: {k}", f"export {name}={k}", f"{name} = {k}"])
        return ctx(t), [k]

    for kind, make in [
        ("aws_access_key_id", aws_key), ("aws_secret_access_key", aws_secret), ("gcp_api_key", gcp_key),
        ("gcp_service_account_json", gcp_sa), ("azure_storage", azure), ("azure_client_secret", azure_client),
        ("github_token", github), ("gitlab_token", gitlab), ("ci_token", ci_token), ("slack_token", slack_token),
        ("slack_webhook", slack_hook), ("discord_webhook", discord_hook), ("discord_bot_token", discord_bot),
        ("telegram_bot_token", telegram), ("stripe_key", stripe), ("openai_key", openai),
        ("anthropic_key", anthropic), ("jwt", jwt), ("pem_private_key", pem), ("url_credentials", url_creds),
        ("connection_string", conn_string), ("password_in_prose", prose), ("key_value", key_value),
        ("cli_flag", cli), ("http_header", http), ("quoted_high_entropy", quoted_entropy),
        ("unquoted_high_entropy", unquoted_entropy),
    ]:
        add(kind, make, 12 if kind in ("url_credentials", "key_value", "password_in_prose", "connection_string",
                                       "http_header", "cli_flag") else 8)
    return out


def negatives(g: Gen) -> list[dict]:
    out: list[dict] = []

    def add(kind: str, make: Callable[[], str], n: int = 18) -> None:
        for _ in range(n):
            out.append({"label": "negative", "kind": kind, "text": make(), "secrets": []})

    def sha(algo: str) -> str:
        return hashlib.new(algo, g.s(ALNUM, 16).encode()).hexdigest()

    add("sha256_hash", lambda: g.pick([
        f"sha256sum: {sha('sha256')}  dist/academyd-0.1.0.tar.gz", f'"sha256": "{sha("sha256")}"',
        f"The adapter file hash is {sha('sha256')}, same as before.", f"checksum = \"{sha('sha256')}\"",
        f"adapter_sha256: {sha('sha256')}", f"Verified the download against {sha('sha256')}"]))
    add("sha1_md5_hash", lambda: g.pick([
        f"md5 {sha('md5')} matches", f"etag: \"{sha('md5')}\"", f"sha1={sha('sha1')}",
        f"the cache entry {sha('sha1')} expired", f'content_md5 = "{sha("md5")}"']))
    add("commit_sha", lambda: g.pick([
        f"commit {sha('sha1')}\nAuthor: Venom <venom@example.com>", f"Reverted {sha('sha1')[:12]} and {sha('sha1')}",
        f"git cherry-pick {sha('sha1')}", f"- repo: venom\n  sha: {sha('sha1')}\n  branch: main",
        f'{{"repo": "venom", "sha": "{sha("sha1")}", "branch": "main"}}', f"Fixed in {sha('sha1')[:7]} (see #42)"]))
    add("uuid", lambda: g.pick([
        f"task_id: {uuid.UUID(int=g.r.getrandbits(128), version=4)}",
        f"request {uuid.UUID(int=g.r.getrandbits(128), version=4)} timed out after 30 s",
        f'"lesson_id": "{uuid.UUID(int=g.r.getrandbits(128), version=4)}"',
        f"trace_id={uuid.UUID(int=g.r.getrandbits(128), version=4)} span_id={g.s(HEX, 16)}",
        f"Created run {uuid.UUID(int=g.r.getrandbits(128), version=4)} for the nightly job"]))
    add("base64_blob", lambda: g.pick([
        f"attachment (base64): {base64.b64encode(g.words(12).encode()).decode()}",
        f'"image": "data:image/png;base64,{base64.b64encode(bytes(g.r.getrandbits(8) for _ in range(48))).decode()}"',
        f"payload={base64.b64encode(json.dumps({'step': g.r.randint(1, 99), 'loss': 0.42}).encode()).decode()}",
        f"The message body was {base64.urlsafe_b64encode(g.words(10).encode()).decode()} before decoding",
        f"  data: {base64.b64encode(bytes(g.r.getrandbits(8) for _ in range(36))).decode()}"]))
    add("long_identifier", lambda: g.pick([
        "AbstractSingletonProxyFactoryBeanDefinitionRegistryPostProcessor.initialize()",
        "user_password_reset_token_expiry_seconds = 3600", "def validate_password_strength(password: str) -> bool:",
        "class TokenBucketRateLimiterMiddlewareConfiguration:", "password_field = models.CharField(max_length=128)",
        "MAX_TOKENS_PER_REQUEST_FOR_THE_PLANNER_AGENT = 4096", "if not check_api_key_permissions(request.user):",
        "self.secret_manager_client = SecretManagerServiceClient()", "tokenizer = AutoTokenizer.from_pretrained('gpt2')",
        "api_key_header_name: X-Request-Source", "get_github_token_from_environment_or_keyring()",
        f"com.venom.academy.{g.words(1)}.SecretRotationScheduler{g.r.randint(1, 9)}"]))
    add("version_string", lambda: g.pick([
        f"Bumped torch from 2.{g.r.randint(0, 13)}.{g.r.randint(0, 9)} to 2.13.0", "version: 1.5.0-rc.2+build.20261201",
        f"python_requires >= 3.11, numpy=={g.r.randint(1, 2)}.{g.r.randint(0, 26)}.{g.r.randint(0, 9)}",
        "Running nats-server v2.15.1 (go1.23.4)", "llama.cpp b4321 / gguf 0.10.0", "node v22.11.0 npm 10.9.0"]))
    add("code_reference", lambda: g.pick([
        'password = os.environ["DB_PASSWORD"]', "api_key = settings.OPENAI_API_KEY", "token = get_token()",
        "secret: ${{ secrets.DEPLOY_KEY }}", "DB_PASSWORD=${DB_PASSWORD:-}", "password: <your-password-here>",
        "api_key: null", 'SECRET_KEY = env("SECRET_KEY")', "password = None", "token: ********",
        "client_secret = config.get('auth', 'client_secret')", "export GITHUB_TOKEN=$(gh auth token)",
        "PASSWORD_FILE=/run/secrets/db_password", "password: changeme", "apiKey: process.env.API_KEY",
        "the token is stored in ~/.config/venom/token"]))
    add("prose_about_secrets", lambda: g.pick([
        "The password field is required and must be at least 12 characters.",
        "Rotate the API key every 90 days and never commit it.", "A password reset link was sent to the user.",
        "Token refresh failed because the clock was skewed by 5 minutes.",
        "Hasło musi mieć co najmniej 12 znaków.", "The secret sauce of the planner is the retry budget.",
        "Login failed: the password was wrong three times.", "We store only bcrypt hashes of passwords.",
        "max_tokens: 4096 and temperature: 0.2 worked best", "The key insight: cache the embeddings per lesson.",
        "Bearer tokens expire after one hour.", "Authorization: the user needs the admin role."]))
    add("url_without_credentials", lambda: g.pick([
        f"https://github.com/venom/venom/commit/{sha('sha1')}", f"see https://docs.example.com/a/b?page={g.r.randint(1, 9)}&q=token",
        "postgresql://db.internal:5432/venom", "mailto:venom@example.com", "ssh://git@github.com/venom/venom.git",
        f"https://huggingface.co/venom/adapter-v{g.r.randint(1, 9)}/resolve/main/adapter.safetensors",
        "redis://cache.venom.local:6379/0", "https://user@example.com/profile"]))
    add("docker_and_lockfile_digests", lambda: g.pick([
        f"image: venom/academy@sha256:{sha('sha256')}",
        f'"integrity": "sha512-{base64.b64encode(hashlib.sha512(g.s(ALNUM, 8).encode()).digest()).decode()}"',
        f"FROM python:3.11-slim@sha256:{sha('sha256')}", f"--hash=sha256:{sha('sha256')}",
        f"resolved \"https://registry.npmjs.org/lodash/-/lodash-4.17.21.tgz#{sha('sha1')}\""]))
    add("numbers_and_ids", lambda: g.pick([
        f"order #{g.r.randint(10**9, 10**10)} shipped", f"IBAN-like ref DE{g.s(DG, 20)} is a test",
        f"span {g.s(HEX, 16)} parent {g.s(HEX, 16)}", f"session_count: {g.r.randint(1, 9999)}",
        f"phone +48 {g.s(DG, 9)}", f"build {g.r.randint(1000, 9999)} took {g.r.randint(1, 59)}m",
        f"ksuid {g.s(ALNUM, 27)} created", f"object key models/v{g.r.randint(1, 99)}/adapter_model.safetensors"]))
    return out


def build(seed: int = SEED) -> list[dict]:
    g = Gen(seed)
    rows = positives(g) + negatives(g)
    for row in rows:  # a secret must really appear where we say it does
        for s in row["secrets"]:
            assert s in row["text"], (row["kind"], s, row["text"])
    return rows


def dump(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def load(path: Path = OUT) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


if __name__ == "__main__":
    data = build()
    OUT.write_text(dump(data), encoding="utf-8")
    kinds = {r["kind"] for r in data if r["label"] == "secret"}
    print(f"{sum(r['label'] == 'secret' for r in data)} secrets of {len(kinds)} kinds, "
          f"{sum(r['label'] == 'negative' for r in data)} negatives -> {OUT}", file=sys.stderr)


def leaked(secret: str, cleaned: str, window: int = 8) -> bool:
    """Any `window` characters of the secret still in the text (a half-redacted secret is a leak)."""
    if len(secret) <= window:
        return secret in cleaned
    return any(secret[i: i + window] in cleaned for i in range(len(secret) - window + 1))


def score(scanner: object, rows: list[dict]) -> dict[str, dict]:
    """Per kind: {"label", "n", "bad", "examples"}; bad = a secret leaked (positives) or any finding
    (negatives). `scanner` is an academyd.secrets.Scanner."""
    texts = [r["text"] for r in rows]
    results = scanner.clean_many(texts)  # type: ignore[attr-defined]
    out: dict[str, dict] = {}
    for row, (cleaned, types, ok) in zip(rows, results, strict=True):
        k = out.setdefault(row["kind"], {"label": row["label"], "n": 0, "bad": 0, "examples": []})
        k["n"] += 1
        if row["label"] == "secret":
            bad = not ok or any(leaked(s, cleaned) for s in row["secrets"])
        else:
            bad = bool(types)
        if bad:
            k["bad"] += 1
            k["examples"].append({"text": row["text"], "cleaned": cleaned, "types": dict(types)})
    return out


def totals(per_kind: dict[str, dict]) -> tuple[float, float]:
    """(recall, false-positive rate) over the whole corpus."""
    pos = [v for v in per_kind.values() if v["label"] == "secret"]
    neg = [v for v in per_kind.values() if v["label"] == "negative"]
    recall = 1 - sum(v["bad"] for v in pos) / sum(v["n"] for v in pos)
    fp = sum(v["bad"] for v in neg) / sum(v["n"] for v in neg)
    return recall, fp
