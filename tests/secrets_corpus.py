"""Two corpora for the secret scan, generated deterministically (a fixed seed, no files).

:func:`ordinary` is what the bus carries every day and must pass untouched: prose, code,
shell commands, JSON configs (with the near-misses of key-like names: ``max_tokens``,
``tokenizer``, ``secretName``, placeholders under ``password``), the ids this system is
full of (UUIDs, sha256 digests, commit ids, message and task ids, trace ids), base64
blobs under ordinary keys, URLs without passwords, long words, and ledgerbus events.

:func:`fakes` are real-shaped, made-up secrets, each in the setting it turns up in
(a credentials file, a .env file, a curl command, JSON at some depth, a connection URL),
following each provider's published format. Each comes with the strings that must not
survive redaction.

Every payload is wrapped the way the router sees it: a ``TaskSubmitted`` encoded by the
codec (see :func:`wire`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ledgerbus.bus import codec
from ledgerbus.bus.events import MemoryWritten, PlanStep, PlanSubmitted, TaskCompleted, TaskSubmitted

SEED = 20240601
ALNUM = string.ascii_letters + string.digits
B64 = ALNUM + "+/"
B64URL = ALNUM + "-_"


@dataclass(frozen=True)
class Fake:
    """A made-up secret in its setting: ``payload`` holds each of ``secrets``."""

    setting: str
    kinds: tuple[str, ...]
    secrets: tuple[str, ...]
    payload: dict[str, Any]


def wire(payload: dict[str, Any], rng: random.Random | None = None) -> bytes:
    """``payload`` as the input of a submission, encoded as the router sees it."""
    r = rng or random.Random(0)
    return codec.encode(TaskSubmitted(id=_msg_id(r), task_id=_msg_id(r), skill="echo", input=payload))


def _pick(r: random.Random, alphabet: str, n: int) -> str:
    return "".join(r.choice(alphabet) for _ in range(n))


def _msg_id(r: random.Random) -> str:
    """Like :func:`bus.events.new_id`: 128 random bits, URL-safe base64."""
    while (fresh := base64.urlsafe_b64encode(r.randbytes(16)).rstrip(b"=").decode()).startswith("-"):
        pass
    return fresh


def _uuid(r: random.Random) -> str:
    return str(uuid.UUID(bytes=r.randbytes(16), version=4))


def _sha256(r: random.Random) -> str:
    return hashlib.sha256(r.randbytes(32)).hexdigest()


def _sha1(r: random.Random) -> str:
    return hashlib.sha1(r.randbytes(20)).hexdigest()  # noqa: S324 - a git commit id, not security


# --- ordinary ------------------------------------------------------------------------------

_WORDS = ("the report covers revenue growth in each region and the board wants a breakdown by product "
          "line before the review meeting on friday please summarise the key findings in three bullet "
          "points with the numbers that matter most to customers and partners across europe and asia "
          "we shipped the new onboarding flow last week and support tickets dropped while latency stayed "
          "flat the migration to the new database finished without downtime").split()
_PROSE = (
    "Reset your password: click the link we sent and choose a new one.",
    "The key: keep every function small and name it for what it does.",
    "Each token: roughly four characters of English text for this tokenizer.",
    "Author: Jane Doe. Reviewed by the security team in March.",
    "auth: see the section on single sign-on in the admin guide.",
    "The secret: consistency beats intensity when you train for a marathon.",
    "Keyboard shortcuts are listed under Help; monkey-patching is discouraged.",
    "She passed the exam with a passing grade and a passphrase-free laptop.",
    "Tokens per second: 45.2 on the small model, 12.8 on the large one.",
    "Password managers generate long random passwords so you never reuse one.",
    "Rotate credentials every 90 days and never paste them into a chat.",
    "The API key page shows when each key was last used, not the key itself.",
    "Asia-Pacific revenue rose; the Akiak office reported flat sales.",
    "Use sk-learn-compatible estimators when you wrap the model for the pipeline.",
    "Our task-runner-ghost-process-cleanup job runs nightly at 02:00 UTC.",
)
_LONG_WORDS = ("pneumonoultramicroscopicsilicovolcanoconiosis", "Donaudampfschifffahrtsgesellschaftskapitaen",
               "supercalifragilisticexpialidocious", "antidisestablishmentarianism",
               "Rindfleischetikettierungsueberwachungsaufgabenuebertragungsgesetz",
               "getUserAccessTokenExpiryInSeconds", "AbstractSingletonProxyFactoryBean",
               "state-of-the-art", "1.24.3-beta.4+build.5678", "hippopotomonstrosesquippedaliophobia")
_CODE = (
    'password = getpass.getpass("Password: ")',
    'token = os.environ["GITHUB_TOKEN"]',
    "api_key = settings.OPENAI_API_KEY",
    "if user.check_password(password):\n    login(request, user)",
    "const token = await getToken(req);",
    'headers = {"Authorization": f"Bearer {token}"}',
    'dbPassword := os.Getenv("DB_PASSWORD")',
    "SELECT id, password_hash FROM users WHERE email = %s",
    'secret_name = "prod/db/credentials"',
    'cache_key = f"user:{uid}:profile"',
    'tokenizer = AutoTokenizer.from_pretrained("bert-base-uncased")',
    "response = client.messages.create(model=model, max_tokens=512, messages=msgs)",
    "def hash_password(password: str) -> str:\n    return bcrypt.hashpw(password.encode(), bcrypt.gensalt())",
    "auth = HTTPBasicAuth(username, password)",
    "client = Client(api_key=api_key, timeout=30)",
    "secret_key = os.urandom(32)",
    'SECRET_KEY = env("DJANGO_SECRET_KEY")',
    "monkey = Monkey(name='george', age=7)",
    "for key, value in sorted(config.items()):\n    print(f'{key}={value}')",
    "token_count = len(tokens)",
    "password=password,",
    "access_token = response.json()['access_token']",
    "let keyMap = new Map(); keyMap.set('ctrl+s', save);",
    "DB_PASSWORD=$(vault read -field=password secret/data/db)",
    "auth_header = request.headers.get('Authorization', '')",
)
_SHELL = (
    'git commit -m "fix: rotate token handling in the session middleware"',
    "docker run -e LOG_LEVEL=info -e WORKERS=4 -p 8080:80 nginx:1.25-alpine",
    'curl -s "https://api.example.com/v1/items?page=2&per_page=50&sort=-created"',
    "kubectl get secret db-credentials -o yaml",
    "kubectl create secret generic app-config --from-file=./config.yaml",
    "export PATH=$HOME/.local/bin:$PATH",
    "aws s3 cp s3://reports-bucket/2024/q3/summary.json ./summary.json",
    "ssh -i ~/.ssh/id_ed25519 deploy@10.0.4.17",
    "psql -h db.internal -U app -d orders -c 'select count(*) from orders'",
    "openssl rand -hex 32",
    "gh auth login --web",
    "npm install --save jsonwebtoken@9.0.2",
    'pip install "passlib[bcrypt]==1.7.4"',
    "echo $AWS_SECRET_ACCESS_KEY | wc -c",
    'grep -rn "api_key" src/ --include=*.py',
    "export AWS_PROFILE=staging AWS_REGION=eu-west-1",
    "git log --format=%H -n 5 origin/main",
    "terraform apply -var-file=prod.tfvars -auto-approve",
    "helm upgrade --install api ./chart --set image.tag=1.4.2 --set replicas=3",
    "find . -name '*.pem' -newer keys.lock -print",
)


def _blob(r: random.Random, n: int) -> str:
    return base64.b64encode(r.randbytes(n)).decode()


def _config(r: random.Random) -> dict[str, Any]:
    """A JSON config with ordinary values under the names that look like secrets' names."""
    pick = r.choice
    makers: list[Callable[[], dict[str, Any]]] = [
        lambda: {"auth": {"type": "oauth2", "token_url": "https://auth.example.com/oauth/token",
                          "scopes": ["read", "write"]}, "retries": r.randint(1, 5)},
        lambda: {"model": pick(["fast", "large", "claude-3-5-sonnet"]), "max_tokens": r.randint(64, 4096),
                 "tokenizer": "cl100k_base", "temperature": round(r.random(), 2)},
        lambda: {"token_type": "Bearer", "expires_in": 3600, "scope": "repo read:org"},
        lambda: {"password_policy": {"min_length": 12, "require_digit": True}, "passwordless": True,
                 "auth_method": "password"},
        lambda: {"volumes": [{"name": "creds", "secret": {"secretName": "db-credentials"}}],
                 "env": [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]},
        lambda: {"public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI" + _pick(r, B64, 43) + " deploy@ci",
                 "key_id": _msg_id(r)},
        lambda: {"primary_key": "id", "sort_key": "created_at", "partition_key": "tenant_id",
                 "idempotency_key": _uuid(r), "cache_key": f"user:{r.randint(1, 10**6)}:profile"},
        lambda: {"author": pick(["Jane Doe", "R. Feynman", "Ada Lovelace"]), "api_version": "2024-06-01",
                 "key": pick(["settings.theme", "notes/2024", "q3-summary"])},
        lambda: {"password": "", "password_hint": "your first pet", "token": None, "secret": False},
        lambda: {"password": "********", "api_key": "<your-api-key>", "token": "YOUR_TOKEN_HERE",
                 "client_secret": "{{ secrets.CLIENT_SECRET }}", "db_password": "${DB_PASSWORD}"},
        lambda: {"next_page_token": _blob(r, 48), "nextToken": _blob(r, 32), "page_token": _msg_id(r),
                 "token_count": r.randint(1, 99999)},
        lambda: {"credentials": {"source": "environment"}, "credential_type": "service_account",
                 "credentials_file": "~/.config/gcloud/application_default_credentials.json"},
        lambda: {"keyboard": {"layout": "us", "repeat_ms": 30}, "monkey": "banana-" + str(r.randint(1, 99)),
                 "turkey_weight_kg": 7.5, "hotkey": "ctrl+shift+p"},
        lambda: {"database": {"host": "db.internal", "port": 5432, "user": "app", "name": "orders",
                              "sslmode": "verify-full"}},
    ]
    return pick(makers)()


_K8S = "bcdfghjklmnpqrstvwxz2456789"  # the alphabet of Kubernetes pod name suffixes


def _identifiers(r: random.Random) -> dict[str, Any]:
    makers: list[Callable[[], dict[str, Any]]] = [
        lambda: {"id": _uuid(r), "request_id": _uuid(r), "parent": _uuid(r)},
        lambda: {"sha256": _sha256(r), "checksum": "sha256:" + _sha256(r), "etag": f'"{_sha256(r)[:32]}"'},
        lambda: {"commit": _sha1(r), "parents": [_sha1(r), _sha1(r)], "tree": _sha1(r)},
        lambda: {"task_id": f"report-{r.randint(2019, 2025)}-q{r.randint(1, 4)}-{r.choice(['eu', 'us', 'apac'])}",
                 "msg_id": _msg_id(r), "parent_task_id": _msg_id(r)},
        lambda: {"trace_id": r.randbytes(16).hex(), "span_id": r.randbytes(8).hex(),
                 "traceparent": f"00-{r.randbytes(16).hex()}-{r.randbytes(8).hex()}-01"},
        lambda: {"image": f"registry.example.com/api@sha256:{_sha256(r)}",
                 "pod": f"api-{_pick(r, _K8S, 9)}-{_pick(r, _K8S, 5)}"},
        lambda: {"md5": hashlib.md5(r.randbytes(8)).hexdigest(),  # noqa: S324 - an etag, not security
                 "ulid": _pick(r, "0123456789ABCDEFGHJKMNPQRSTVWXYZ", 26), "object": f"s3://bucket/{_uuid(r)}.parquet"},
    ]
    return r.choice(makers)()


def _blobs(r: random.Random) -> dict[str, Any]:
    n = r.randint(60, 3000)
    makers: list[Callable[[], dict[str, Any]]] = [
        lambda: {"image": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA" + _blob(r, n)},
        lambda: {"thumbnail": "/9j/4AAQSkZJRgABAQ" + _blob(r, n), "mime": "image/jpeg"},
        lambda: {"attachment": {"name": "report.pdf", "content": "JVBERi0xLjcK" + _blob(r, n)}},
        lambda: {"data": _blob(r, n), "encoding": "base64"},
        lambda: {"embedding_b64": base64.b64encode(r.randbytes(4 * 384)).decode()},
    ]
    return r.choice(makers)()


def _urls(r: random.Random) -> dict[str, Any]:
    host = r.choice(["example.com", "api.example.org", "db.internal", "github.com", "localhost"])
    return {"url": r.choice([
        f"https://{host}/v1/items/{r.randint(1, 10**6)}?page={r.randint(1, 9)}&sort=desc",
        f"https://{host}:8443/health",
        f"https://deploy@{host}/org/repo.git",
        "ssh://git@github.com:22/org/repo.git",
        "git@github.com:org/repo.git",
        f"postgres://{host}:5432/orders",
        "redis://cache:6379/0",
        f"s3://bucket/{_uuid(r)}/key.json",
        "file:///etc/hosts",
        "http://[::1]:8080/metrics",
        "https://medium.com/@jane/how-we-cut-latency-in-half-3f2a9c",
        "https://example.com/login?redirect=https://example.com/home&lang=en",
        f"https://www.npmjs.com/package/@types/node/v/{r.randint(14, 22)}.0.0",
    ])}


def _event(r: random.Random) -> bytes:
    """A ledgerbus event of another kind than a submission, as the router sees it."""
    return codec.encode(r.choice([
        lambda: TaskCompleted(id=_msg_id(r), task_id=_msg_id(r), attempt=1,
                              output={"summary": " ".join(r.choices(_WORDS, k=30)), "tokens": r.randint(1, 900)}),
        lambda: MemoryWritten(id=_msg_id(r), agent="echo-1", section="knowledge", key=f"fact-{r.randint(1, 99)}",
                              value={"text": " ".join(r.choices(_WORDS, k=12))}),
        lambda: PlanSubmitted(id=_msg_id(r), task_id=_msg_id(r), name="nightly", steps=[
            PlanStep(id="fetch", skill="shell", input={"argv": ["echo", "fetch"]}),
            PlanStep(id="summarise", skill="llm.chat", input={"prompt": "Summarise", "max_tokens": 256},
                     deps=["fetch"])]),
    ])())


def ordinary() -> list[tuple[str, bytes]]:
    """About two thousand ordinary messages, each ``(category, bytes as the router sees them)``."""
    r = random.Random(SEED)
    out: list[tuple[str, bytes]] = []

    def add(category: str, count: int, make: Callable[[], dict[str, Any]]) -> None:
        out.extend((category, wire(make(), r)) for _ in range(count))

    add("prose", 300, lambda: {"text": " ".join([r.choice(_PROSE)] + r.choices(_WORDS, k=r.randint(5, 120))
                                                + [r.choice(_PROSE)])})
    add("code", 300, lambda: {"language": "python", "snippet": "\n".join(r.sample(_CODE, k=r.randint(1, 6)))})
    add("shell", 200, lambda: {"argv": ["sh", "-c", r.choice(_SHELL)], "cwd": "/srv/app"})
    add("json config", 300, lambda: _config(r))
    add("json in a string", 100, lambda: {"config_json": json.dumps(_config(r))})
    add("ids and digests", 300, lambda: _identifiers(r))
    add("base64 blobs", 200, lambda: _blobs(r))
    add("urls", 200, lambda: _urls(r))
    add("long words", 100, lambda: {"text": " ".join(r.choices(_LONG_WORDS, k=r.randint(1, 8)))})
    out.extend(("ledgerbus events", _event(r)) for _ in range(100))
    return out


# --- fakes ---------------------------------------------------------------------------------


def _aws(r: random.Random) -> tuple[str, str]:
    return r.choice(["AKIA", "ASIA"]) + _pick(r, string.ascii_uppercase + "234567", 16), _pick(r, B64, 40)


def _password(r: random.Random) -> str:
    return r.choice([
        lambda: _pick(r, ALNUM + "!#%*+-.?@^_~", r.randint(10, 24)),
        lambda: r.choice(["Summer", "Winter", "Dragon", "Shadow"]) + str(r.randint(1990, 2030)) + r.choice("!#?*"),
        lambda: _pick(r, string.ascii_lowercase, 4) + _pick(r, string.digits, 4) + _pick(r, string.ascii_uppercase, 2),
    ])()


def _jwt(r: random.Random) -> str:
    def seg(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return ".".join([seg({"alg": "HS256", "typ": "JWT"}),
                     seg({"sub": _uuid(r), "iat": r.randint(1_600_000_000, 1_800_000_000), "scope": "read write"}),
                     _pick(r, B64URL, 43)])


def _pem(r: random.Random) -> str:
    label = r.choice(["RSA PRIVATE KEY", "EC PRIVATE KEY", "PRIVATE KEY", "OPENSSH PRIVATE KEY",
                      "ENCRYPTED PRIVATE KEY", "PGP PRIVATE KEY BLOCK"])
    body = _blob(r, r.randint(120, 1200))
    lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----"


def fakes() -> list[Fake]:
    """Made-up secrets of every kind the scan knows, each in a few settings."""
    r = random.Random(SEED + 1)
    out: list[Fake] = []

    def add(setting: str, kinds: tuple[str, ...], secrets: tuple[str, ...], payload: dict[str, Any]) -> None:
        out.append(Fake(setting, kinds, secrets, payload))

    for _ in range(10):
        key_id, secret = _aws(r)
        pair = ("aws-access-key-id", "aws-secret-access-key")
        add("aws credentials file", pair, (key_id, secret), {"file": "~/.aws/credentials", "content":
            f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\nregion = eu-west-1\n"})
        add("aws env", pair, (key_id, secret),
            {"argv": ["sh", "-c", f"export AWS_ACCESS_KEY_ID={key_id} AWS_SECRET_ACCESS_KEY={secret}; aws s3 ls"]})
        add("aws json", pair, (key_id, secret),
            {"Credentials": {"AccessKeyId": key_id, "SecretAccessKey": secret, "Expiration": "2025-01-01T00:00:00Z"}})
        add("aws boto3", pair, (key_id, secret),
            {"snippet": f"boto3.client('s3', aws_access_key_id='{key_id}', aws_secret_access_key='{secret}')"})
        add("aws prose", pair, (key_id, secret), {"text": f"id {key_id} and the secret {secret} for the bucket"})
    for _ in range(20):
        tok = r.choice(["ghp_", "gho_", "ghu_", "ghs_", "ghr_"]) + _pick(r, ALNUM, 36)
        pat = "github_pat_" + _pick(r, ALNUM, 22) + "_" + _pick(r, ALNUM, 59)
        add("github token", ("github-token",), (tok,), {"argv": ["git", "clone", f"https://{tok}@github.com/o/r.git"]})
        add("github fine-grained", ("github-token",), (pat,), {"env": {"GH_TOKEN": pat}})
        slack = f"xox{r.choice('bp')}-{_pick(r, string.digits, 12)}-{_pick(r, string.digits, 13)}-{_pick(r, ALNUM, 24)}"
        add("slack", ("slack-token",), (slack,), {"text": f"bot token {slack} for #alerts"})
        stripe = r.choice(["sk_live_", "rk_live_"]) + _pick(r, ALNUM, r.choice([24, 99]))
        add("stripe", ("stripe-secret-key",), (stripe,), {"config": {"stripe": {"key": stripe}}})
        google = "AIza" + _pick(r, B64URL, 35)
        add("google api key", ("google-api-key",), (google,), {"url": f"https://maps.googleapis.com/x?key={google}"})
        gocspx = "GOCSPX-" + _pick(r, B64URL, 28)
        add("google oauth client", ("google-oauth-client-secret",), (gocspx,),
            {"installed": {"client_id": f"{r.randint(10**11, 10**12)}-abc.apps.googleusercontent.com",
                           "client_secret": gocspx}})
        ant = "sk-ant-api03-" + _pick(r, B64URL, 93) + "AA"
        add("anthropic", ("anthropic-api-key",), (ant,), {"snippet": f'client = Anthropic(api_key="{ant}")'})
        oai = r.choice(["sk-proj-" + _pick(r, B64URL, 156), "sk-" + _pick(r, ALNUM, 48),
                        "sk-svcacct-" + _pick(r, B64URL, 120)])
        add("openai", ("openai-api-key",), (oai,), {"text": f"OPENAI_API_KEY={oai}"})
        jwt = _jwt(r)
        add("jwt", ("jwt",), (jwt,), {"argv": ["curl", "-H", f"Authorization: Bearer {jwt}", "https://x.example"]})
        pem = _pem(r)
        add("private key", ("private-key",), (pem.split("\n")[2],), {"files": {"id_key": pem}})
    for _ in range(20):
        pw = _pick(r, ALNUM + "-._~!*", r.randint(10, 24))
        url = r.choice([f"postgres://app:{pw}@db.internal:5432/orders",
                        f"mongodb+srv://admin:{pw}@cluster0.ab1cd.mongodb.net/",
                        f"redis://:{pw}@cache:6379/0", f"https://jane:{pw}@example.com/dav/",
                        f"amqp://guest:{pw}@rabbit:5672/"])
        add("url password", ("url-password",), (pw,), {"env": {"DATABASE_URL": url}})
    for _ in range(20):
        pw = _password(r)
        add("json password", ("password",), (pw,), {"db": {"primary": {"user": "app", "password": pw}}})
        add("dotenv", ("password", "secret"), (pw,), {"file": ".env", "content": f"DEBUG=false\nDB_PASSWORD={pw}\n"})
        add("yaml", ("password",), (pw,), {"content": f"database:\n  user: app\n  password: '{pw}'\n"})
        add("json in a string", ("password",), (pw,), {"body": json.dumps({"username": "jane", "passwd": pw})})
        add("cli flag", ("password",), (pw,), {"argv": ["mysql", "-u", "root", f"--password={pw}", "orders"]})
        secret = r.choice([_pick(r, "0123456789abcdef", 40), _pick(r, "0123456789abcdef", 32), _pick(r, ALNUM, 32),
                           _pick(r, ALNUM, 3) + "8Q~" + _pick(r, ALNUM + "-_.~", 34)])
        name = r.choice(["client_secret", "auth_token", "api_key", "apiKey", "x-api-key", "access_token",
                         "refresh_token", "secret_key", "AZURE_CLIENT_SECRET", "webhookSecret", "privateKey",
                         "SESSION_TOKEN", "credentials"])
        add(f"json {name}", ("secret", "password"), (secret,), {"service": {"name": "billing", name: secret}})
        add("query string", ("secret",), (secret,), {"url": f"https://api.example.com/v2/data?api_key={secret}&page=2"})
        add("bearer header", ("secret",), (secret,), {"headers": {"Authorization": f"Bearer {secret}"}})
        add("shell export", ("secret", "password"), (secret,),
            {"argv": ["sh", "-c", f"export API_TOKEN={secret} && ./deploy.sh"]})
    return out
