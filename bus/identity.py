"""Identities: one NATS user per principal, with permissions that bind it to its subjects.

A principal is ``admin``, ``router``, ``projector``, ``cli-<name>`` or ``agent-<name>``;
its NATS user has the same name. What each may do is generated here, per kind:

- ``agent-<name>`` publishes only on ``in.agent.<name>.>`` and its own heartbeat keys, and
  may pull, ack and create only the WORK consumers of the skills it was given and of the
  work assigned to it (``assign.<name>.>``), each with its own filter, and asks
  the projector only what a skill needs (its memory, shared context, tasks, verdicts);
- ``cli-<name>`` publishes only on ``in.cli.<name>.>``, asks the projector, reads AUDIT;
- everyone reads only their own inbox, ``_INBOX_<principal>.>`` (and an agent what the
  router tells it, ``notify.agent.<name>.>``);
- only ``router`` writes ``audit.>``, ``work.>`` and ``assign.>`` and the chain's anchor (the ``chain``
  bucket, which ``cli-<name>`` may read), and only it reads or writes its snapshots (the
  ``snapshots`` object store); only ``admin`` and ``router`` manage streams;
- only ``projector`` writes (and prunes) the projection snapshots (the ``projections``
  object store), which it and ``cli-<name>`` (``agentctl replay``) may read; both may read
  one AUDIT record by its sequence, to check a snapshot's tie to the log;
- everyone publishes the spans it records on ``traces.*.<principal>``, and only there, so
  a span's publisher is known; ``cli-<name>`` reads TRACES (``agentctl trace``);
- agents and ``cli-<name>`` store recorded LLM calls on ``llmcalls.<sha256 of the body>``
  (first write wins) and read them by that name;
- likewise everyone publishes its metrics snapshots on ``metrics.<principal>.*`` only;
  ``cli-<name>`` reads METRICS, and the size of every stream and of WORK's consumers (the
  gateway's ``/metrics``), never their messages.

The registry (``principals.json``), the users file nats.conf includes (``users.conf``)
and one credentials file per principal (``creds/<principal>.json``) live in one
directory, ``var/auth`` by default, all readable by their owner only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import getpass
import json
import os
import re
import secrets
import shlex
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from ledgerbus.bus import subjects
from ledgerbus.bus.errors import ConfigError

SINGLETONS = ("admin", "router", "projector")
USERS_FILE = "users.conf"
REGISTRY_FILE = "principals.json"
CREDS_DIR = "creds"


@dataclass(frozen=True, slots=True)
class Identity:
    """A principal that may connect: its kind, name and (for agents) skills."""

    kind: str
    name: str = ""
    skills: tuple[str, ...] = ()

    @property
    def user(self) -> str:
        """The NATS user (and principal token)."""
        return self.kind if self.kind in SINGLETONS else f"{self.kind}-{self.name}"

    @property
    def inbox_prefix(self) -> str:
        """The private inbox prefix this principal's replies use."""
        return subjects.inbox_prefix(self.user)

    @property
    def principal(self) -> subjects.Principal:
        """The principal whose ingress and notify subjects a cli or agent identity owns."""
        return subjects.Principal(self.kind, self.name)


def identity(kind: str, name: str = "", skills: Iterable[str] = ()) -> Identity:
    """Validate and build an identity."""
    if kind in SINGLETONS:
        if name:
            raise ConfigError(f"{kind} has no name")
        return Identity(kind)
    if kind not in ("cli", "agent"):
        raise ConfigError(f"kind must be one of {', '.join((*SINGLETONS, 'cli', 'agent'))}, not {kind!r}")
    try:
        subjects.check_name(name, f"{kind} name")
        skill_list = tuple(sorted({subjects.check_skill(s) for s in skills}))
    except subjects.SubjectError as exc:
        raise ConfigError(str(exc)) from exc
    if kind == "cli" and skill_list:
        raise ConfigError("skills are for agents")
    return Identity(kind, name, skill_list)


class Credentials(msgspec.Struct, frozen=True):
    """What a process needs to connect as its principal."""

    user: str
    password: str
    inbox_prefix: str


_CHAIN_HEAD = subjects.kv_subject(subjects.CHAIN_BUCKET, subjects.CHAIN_HEAD_KEY)
_KV_AGENTS = subjects.kv_stream(subjects.AGENTS_BUCKET)
_KV_ROUTER = subjects.kv_stream(subjects.ROUTER_BUCKET)
_KV_CHAIN = subjects.kv_stream(subjects.CHAIN_BUCKET)
_OBJ_SNAPSHOTS = subjects.obj_stream(subjects.SNAPSHOT_BUCKET)
_OBJ_PROJECTIONS = subjects.obj_stream(subjects.PROJECTION_BUCKET)
_ANY, _REST = subjects.WILDCARD, subjects.FULL_WILDCARD

# What a skill may ask the projector (ctx.memory, ctx.shared, ctx.tasks): not the audit
# index, the approvals or the digest, which are for operators.
AGENT_QUERIES = (
    subjects.query("memory", "get"), subjects.query("checkpoints", "list"), subjects.query("shared", "get"),
    subjects.query("shared", "list"), subjects.query("tasks", "get"), subjects.query("audit", "verdict"),
)


_RECORDINGS = (subjects.LLMCALLS_ALL, subjects.js_direct_get(subjects.LLMCALLS_STREAM, subjects.LLMCALLS_ALL))
"""Recorded LLM calls (``agents/llm/calls.py``): stored by content hash, and read by it
(replay, ``agentctl llm show``). Agents store their calls; ``cli-<name>`` stores the
recordings ``agentctl fork`` makes. A call's body must hash to its name, so whoever stores
one cannot pass off another's."""


def _follows(stream: str) -> list[str]:
    """What reading ``stream`` through an ordered consumer takes: creating the consumer,
    by the old API and the named one."""
    return [subjects.js_consumer_create(stream), subjects.js_consumer_create(stream, _REST)]


def _pulls(stream: str, consumer: str | None = None, create: bool = True) -> list[str]:
    """What pulling from the durable ``consumer`` of ``stream`` (None: any of its
    consumers) takes: binding to it (``create``: creating it with the legacy durable API,
    whose filter the server does not check), pulling, and acking what it delivers."""
    name, acks = ((_REST,), (_REST,)) if consumer is None else ((consumer,), (consumer, _REST))
    made = [subjects.js_consumer_durable_create(stream, *name)] if create else []
    return [*made, subjects.js_consumer_info(stream, *name),
            subjects.js_consumer_next(stream, *name), subjects.js_ack(stream, *acks)]


def permissions(ident: Identity) -> dict[str, Any]:
    """The NATS permissions of one principal."""
    inbox = subjects.inbox_all(ident.user)
    if ident.kind == "admin":
        pub = [subjects.JS_API_ALL, subjects.JS_ACK_ALL, subjects.JS_FC_ALL, subjects.QUERY_ALL]
        sub = [inbox]
    elif ident.kind == "router":
        streams = (subjects.INGRESS_STREAM, subjects.AUDIT_STREAM, subjects.WORK_STREAM, subjects.DEADLETTER_STREAM,
                   subjects.TRACES_STREAM, subjects.METRICS_STREAM, subjects.LLMCALLS_STREAM, _KV_AGENTS, _KV_ROUTER, _KV_CHAIN, _OBJ_SNAPSHOTS,
                   _OBJ_PROJECTIONS)
        pub = [subjects.AUDIT_ALL, subjects.WORK_ALL, subjects.ASSIGN_ALL, subjects.NOTIFY_ALL, subjects.JS_API_INFO,
               subjects.js_stream_info(_ANY), subjects.JS_FC_ALL,
               *(subjects.js_stream_create(s) for s in streams), *(subjects.js_stream_update(s) for s in streams),
               subjects.js_stream_msg_get(subjects.AUDIT_STREAM), subjects.js_direct_get(subjects.AUDIT_STREAM),
               # Retention (router/retention.py): AUDIT purged below a cut the chain records first.
               subjects.js_stream_purge(subjects.AUDIT_STREAM), subjects.js_consumer_info(subjects.AUDIT_STREAM, _REST),
               *_follows(subjects.INGRESS_STREAM), *_pulls(subjects.INGRESS_STREAM),
               *_follows(subjects.AUDIT_STREAM), *_follows(_KV_AGENTS),
               subjects.js_consumer_delete(_KV_AGENTS, _REST), subjects.js_consumer_info(_KV_AGENTS, _REST),
               subjects.js_consumer_create(subjects.DEADLETTER_STREAM, _REST), *_pulls(subjects.DEADLETTER_STREAM),
               subjects.js_stream_msg_get(subjects.WORK_STREAM), subjects.js_stream_msg_delete(subjects.WORK_STREAM),
               subjects.kv_subject(subjects.ROUTER_BUCKET, _REST), subjects.js_direct_get(_KV_ROUTER, _REST),
               subjects.js_stream_msg_get(_KV_ROUTER),
               # The chain's anchor: one key, written and read back, nothing else in the bucket.
               _CHAIN_HEAD, subjects.js_direct_get(_KV_CHAIN, _CHAIN_HEAD),
               # Its snapshots (router/snapshots.py): written, listed and read back, the
               # old ones purged; nobody else may read or write them.
               subjects.obj_all(subjects.SNAPSHOT_BUCKET), subjects.js_stream_msg_get(_OBJ_SNAPSHOTS),
               subjects.JS_STREAM_NAMES,
               subjects.js_stream_purge(_OBJ_SNAPSHOTS), *_follows(_OBJ_SNAPSHOTS)]
        sub = [inbox]
    elif ident.kind == "projector":
        pub = [subjects.JS_API_INFO, subjects.js_stream_info(subjects.AUDIT_STREAM),
               *_follows(subjects.AUDIT_STREAM), subjects.JS_FC_ALL,
               # Projection snapshots (projections/snapshots.py): written, listed, read back
               # and checked against the AUDIT record at their position, the old ones purged.
               subjects.js_stream_msg_get(subjects.AUDIT_STREAM), subjects.js_stream_info(_OBJ_PROJECTIONS),
               subjects.obj_all(subjects.PROJECTION_BUCKET), subjects.js_stream_msg_get(_OBJ_PROJECTIONS),
               subjects.JS_STREAM_NAMES, subjects.js_stream_purge(_OBJ_PROJECTIONS), *_follows(_OBJ_PROJECTIONS)]
        sub = [inbox, subjects.QUERY_ALL]
    elif ident.kind == "cli":
        pub = [subjects.ingress_all(ident.principal), subjects.QUERY_ALL, subjects.JS_API_INFO,
               subjects.js_stream_info(subjects.AUDIT_STREAM), subjects.js_stream_info(_KV_AGENTS),
               *_follows(subjects.AUDIT_STREAM), subjects.js_consumer_info(subjects.AUDIT_STREAM, _REST),
               *_follows(_KV_AGENTS), subjects.js_consumer_info(_KV_AGENTS, _REST),
               subjects.js_direct_get(_KV_AGENTS, _REST), subjects.JS_FC_ALL,
               subjects.js_stream_info(subjects.WORK_STREAM), subjects.js_stream_info(subjects.TRACES_STREAM),
               *_follows(subjects.TRACES_STREAM), subjects.js_consumer_info(subjects.TRACES_STREAM, _REST),
               # audit verify compares the log with the chain's anchor (read only).
               subjects.js_stream_info(_KV_CHAIN), subjects.js_direct_get(_KV_CHAIN, _CHAIN_HEAD),
               # The gateway's /metrics: every process's snapshot, and how full each stream
               # and each WORK consumer is (counts only: no message of theirs).
               subjects.js_stream_info(subjects.METRICS_STREAM), subjects.js_direct_get(subjects.METRICS_STREAM, _REST),
               subjects.js_stream_info(subjects.INGRESS_STREAM), subjects.js_stream_info(subjects.DEADLETTER_STREAM),
               subjects.js_consumer_list(subjects.WORK_STREAM),
               # agentctl replay starts from a projection snapshot (read only), checked
               # against the AUDIT record at its position.
               subjects.js_stream_msg_get(subjects.AUDIT_STREAM), subjects.js_stream_info(_OBJ_PROJECTIONS),
               subjects.js_stream_msg_get(_OBJ_PROJECTIONS), subjects.JS_STREAM_NAMES, *_follows(_OBJ_PROJECTIONS),
               *_RECORDINGS]
        sub = [inbox]
    else:
        pub = [subjects.ingress_all(ident.principal),
               subjects.kv_subject(subjects.AGENTS_BUCKET, subjects.heartbeat_keys(ident.name)), subjects.JS_API_INFO,
               subjects.js_stream_info(subjects.WORK_STREAM), subjects.js_stream_info(_KV_AGENTS), *AGENT_QUERIES,
               *_RECORDINGS]
        # A WORK consumer is created only through the API subject that names its filter (the
        # server checks it against the configuration), so each consumer reads only its queue:
        # the skills' shared queues, and the work assigned to this agent, which no other
        # identity may read.
        queues = [(subjects.work_consumer(skill), subjects.work(skill)) for skill in ident.skills]
        queues.append((subjects.assigned_consumer(ident.name), subjects.assigned_all(ident.name)))
        for consumer, filter_subject in queues:
            pub += [subjects.js_consumer_create(subjects.WORK_STREAM, consumer, filter_subject),
                    *_pulls(subjects.WORK_STREAM, consumer, create=False)]
        sub = [inbox, subjects.notify_all(ident.principal)]
    pub += [subjects.traces_by(ident.user), subjects.metrics_by(ident.user)]
    perms: dict[str, Any] = {"publish": {"allow": pub}, "subscribe": {"allow": sub}}
    if ident.kind == "projector":
        perms["allow_responses"] = True  # answer queries on the askers' private inboxes
    return perms


@dataclass
class Registry:
    """The principals of one installation, stored under ``directory``."""

    directory: Path
    entries: dict[str, tuple[Identity, str]] = field(default_factory=dict)
    extra_users: list[dict[str, Any]] = field(default_factory=list)
    """Users written verbatim (test harnesses); never made by ``agentctl keys``."""

    @classmethod
    def load(cls, directory: Path) -> Registry:
        """The registry in ``directory`` (empty if there is none yet)."""
        reg = cls(directory)
        path = directory / REGISTRY_FILE
        if path.exists():
            try:
                data = json.loads(path.read_text())
                for row in data["principals"]:
                    # Validated again: the names become subject tokens in permissions.
                    ident = identity(row["kind"], row.get("name", ""), row.get("skills", ()))
                    reg.entries[ident.user] = (ident, row["password"])
                reg.extra_users = data.get("extra_users", [])
            except (OSError, ValueError, KeyError, ConfigError) as exc:
                raise ConfigError(f"{path}: {exc}") from exc
        return reg

    def add(self, ident: Identity) -> Credentials:
        """Add (or replace the skills of) a principal; keep its password if it had one."""
        password = self.entries[ident.user][1] if ident.user in self.entries else secrets.token_urlsafe(24)
        self.entries[ident.user] = (ident, password)
        return Credentials(ident.user, password, ident.inbox_prefix)

    def users_conf(self) -> str:
        """The users file nats.conf includes: every principal with its permissions."""
        users = [{"user": i.user, "password": p, "permissions": permissions(i)} for i, p in self.entries.values()]
        users += self.extra_users
        return ("# Generated by ledgerbus (bus/identity.py); edit with `agentctl keys`.\n"
                f"users = {json.dumps(users, indent=2)}\n")

    def stale(self) -> bool:
        """Whether the users file on disk differs from what this version generates (the
        permissions of a newer ledgerbus): ``ensure_local`` then rewrites it."""
        try:
            return (self.directory / USERS_FILE).read_text() != self.users_conf()
        except OSError:
            return True

    def save(self) -> None:
        """Write the registry, the users file and every credentials file (owner-only)."""
        (self.directory / CREDS_DIR).mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        os.chmod(self.directory / CREDS_DIR, 0o700)
        rows = [{"kind": i.kind, "name": i.name, "skills": list(i.skills), "password": p}
                for i, p in self.entries.values()]
        _write_private(self.directory / REGISTRY_FILE,
                       json.dumps({"principals": rows, "extra_users": self.extra_users}, indent=2))
        _write_private(self.directory / USERS_FILE, self.users_conf())
        for ident, password in self.entries.values():
            creds = Credentials(ident.user, password, ident.inbox_prefix)
            _write_private(self.directory / CREDS_DIR / f"{ident.user}.json", msgspec.json.encode(creds).decode())


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


_AGENT_LINE = re.compile(r"^\s*[\w-]+\s*:\s*(.*\bagentctl\b.*\bagent\b.*)$")


def procfile_agents(procfile: Path, profile_skills: Callable[[str], list[str]] | None = None) -> list[Identity]:
    """The agents a Procfile starts: ``agentctl agent --name N --skills a,b``, and, given
    ``profile_skills`` (a profile's name → its skills), each ``--profile NAME`` of a line."""
    found: list[Identity] = []
    if not procfile.exists():
        return found
    for line in procfile.read_text().splitlines():
        m = _AGENT_LINE.match(line)
        if not m:
            continue
        args = shlex.split(m.group(1))
        opts = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
        if "--name" in opts and "--skills" in opts:
            found.append(identity("agent", opts["--name"], opts["--skills"].split(",")))
        if profile_skills is not None:
            found += [identity("agent", args[i + 1], profile_skills(args[i + 1]))
                      for i in range(len(args) - 1) if args[i] == "--profile"]
    return found


_USERS_INCLUDE = re.compile(r"""^\s*include\s+["']?([^"'\s]*\b""" + re.escape(USERS_FILE) + r")", re.MULTILINE)


def users_dir(config: Path) -> Path:
    """The directory of the users file a server configuration includes: ``var/auth``
    beside nats.conf, the repo's ``var/auth`` for a node of ``nats-cluster/`` (which
    includes ``../var/auth/users.conf``). ``agentctl nats`` makes the identities there."""
    try:
        m = _USERS_INCLUDE.search(config.read_text())
    except OSError as exc:
        raise ConfigError(f"no nats-server configuration at {config}: {exc.strerror}") from exc
    if m is None:
        return config.parent / "var" / "auth"
    return Path(os.path.normpath(config.parent / m.group(1))).parent


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # The three nodes of a one-machine cluster start together and share one registry: without
    # the lock each would make its own passwords for the same principals.
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_local(directory: Path, cli_user: str, procfile: Path | None = None,
                 profile_skills: Callable[[str], list[str]] | None = None) -> bool:
    """Make the identities a local system needs, if missing: admin, router, projector, the
    person's CLI user and the Procfile's agents (``profile_skills``: see
    :func:`procfile_agents`). Returns whether anything was added."""
    with _locked(directory):
        reg = Registry.load(directory)
        wanted = [identity("admin"), identity("router"), identity("projector"), identity("cli", cli_user)]
        if procfile is not None:
            wanted += procfile_agents(procfile, profile_skills)
        missing = [i for i in wanted if i.user not in reg.entries or reg.entries[i.user][0] != i]
        for ident in missing:
            reg.add(ident)
        if missing or not (directory / USERS_FILE).exists() or reg.stale():
            reg.save()
            return True
        return False


def write_users(directory: Path, identities: Iterable[Identity], extra_users: Iterable[dict[str, Any]] = ()) -> None:
    """Add ``identities`` (and ``extra_users`` verbatim) to the registry in ``directory``
    and write its users file and credentials: the auth of a test or benchmark server."""
    reg = Registry.load(directory)
    for ident in identities:
        reg.add(ident)
    reg.extra_users = list(extra_users)
    reg.save()


def write_local_config(
    directory: Path, base_config: Path, identities: Iterable[Identity], extra_users: Iterable[dict[str, Any]] = ()
) -> Path:
    """A copy of ``base_config`` in ``directory`` with its own ``var/auth`` holding
    ``identities``: a self-contained server configuration (tests, benchmarks). Returns
    the configuration's path; the credentials are in ``directory / "var" / "auth"``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / base_config.name
    config.write_text(base_config.read_text())
    write_users(users_dir(config), identities, extra_users)
    return config


async def wait_for_credentials(directory: Path, user: str, timeout: float) -> Credentials:
    """Read ``creds/<user>.json``, waiting up to ``timeout`` for it to appear (first run)."""
    path = directory / CREDS_DIR / f"{user}.json"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not path.exists():
        if loop.time() >= deadline:
            raise ConfigError(
                f"no credentials for {user} at {path}: create them with `agentctl keys add`, "
                "or set LEDGERBUS_USER and LEDGERBUS_PASSWORD"
            )
        await asyncio.sleep(0.1)
    try:
        return msgspec.json.decode(path.read_bytes(), type=Credentials)
    except (OSError, msgspec.DecodeError) as exc:
        raise ConfigError(f"credentials {path}: {exc}") from exc


def cli_name() -> str:
    """The name a CLI user acts as (principal ``cli-<name>``): ``LEDGERBUS_CLI_NAME`` or
    the login name, made safe."""
    raw = os.environ.get("LEDGERBUS_CLI_NAME") or getpass.getuser() or "user"
    name = re.sub(r"[^a-z0-9_-]+", "-", raw.lower()).strip("-_")[:48]
    return name or "user"
