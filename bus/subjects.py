"""Every subject, stream, consumer, bucket and header name, built in one place.

Nothing else in ledgerbus writes a subject by hand: routing rules and nats.conf
permissions both follow from the shapes below.

- ``in.<pkind>.<pname>.<kind>``      INGRESS: every message to the router, from principal
                                     ``<pkind>-<pname>`` (e.g. ``in.agent.echo-1.task_started``)
- ``audit.<verdict>.<kind>.<key>``   AUDIT: one record per ingress message
- ``work.<skill>``                   WORK: tasks for any agent with the skill, one pull
                                     consumer per skill, shared by those agents
- ``assign.<agent>.<skill>``         WORK: tasks assigned to one agent (its live instances,
                                     a pool), one pull consumer per agent that only it may
                                     read (a skill never makes an ``assign.`` subject)
- ``q.<projection>.<op>``            queries answered by the projector
- ``notify.<pkind>.<pname>.<topic>`` the router's word to one principal (claim verdicts,
                                     cancellations): core NATS, best effort
- ``traces.<trace id>.<principal>``  TRACES: finished spans, published by the process that
                                     recorded them (short retention)
- ``metrics.<principal>.<instance>`` METRICS: the latest metrics snapshot of one process
                                     (the only message its subject keeps)
"""

from __future__ import annotations

import base64
import functools
import re
from dataclasses import dataclass
from typing import Final

INGRESS_STREAM: Final = "INGRESS"
AUDIT_STREAM: Final = "AUDIT"
WORK_STREAM: Final = "WORK"
DEADLETTER_STREAM: Final = "DEADLETTERS"
TRACES_STREAM: Final = "TRACES"
METRICS_STREAM: Final = "METRICS"
LLMCALLS_STREAM: Final = "LLMCALLS"
DEADLETTER_ALL: Final = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.WORK.*"
"""JetStream's advisories for WORK messages delivered MaxDeliver times without an ack."""
DEADLETTER_CONSUMER: Final = "router-deadletters"
AGENTS_BUCKET: Final = "agents"
ROUTER_BUCKET: Final = "router"
"""The router's leader lease (key ``leader``; the bucket's TTL is the lease)."""
ROUTER_LEADER_KEY: Final = "leader"
CHAIN_BUCKET: Final = "chain"
"""The chain's anchor outside AUDIT: the router's last signed checkpoint (``bus/anchor.py``)."""
CHAIN_HEAD_KEY: Final = "head"
CHAIN_HISTORY: Final = 16
"""How many anchors, the newest and those before it, the ``chain`` bucket keeps (no TTL)."""
SNAPSHOT_BUCKET: Final = "snapshots"
"""The router's signed snapshots of its folded state (an object store: ``router/snapshots.py``)."""
PROJECTION_BUCKET: Final = "projections"
"""Snapshots of the projection database (an object store: ``projections/snapshots.py``)."""

INGRESS_ALL: Final = "in.>"
AUDIT_ALL: Final = "audit.>"
WORK_ALL: Final = "work.>"
ASSIGN_ALL: Final = "assign.>"
TRACES_ALL: Final = "traces.>"
METRICS_ALL: Final = "metrics.>"
LLMCALLS_ALL: Final = "llmcalls.*"

ROUTER_CONSUMER: Final = "router"
PROJECTOR_QUEUE: Final = "projector"

HDR_MSG_ID: Final = "Nats-Msg-Id"
HDR_EXPECTED_LAST_SEQ: Final = "Nats-Expected-Last-Sequence"
HDR_EXPECTED_LAST_MSG_ID: Final = "Nats-Expected-Last-Msg-Id"
HDR_TRACEPARENT: Final = "traceparent"
HDR_TRACESTATE: Final = "tracestate"
HDR_METRICS_INTERVAL: Final = "Ledgerbus-Metrics-Interval"
"""How often (seconds) the process that published a METRICS snapshot publishes the next."""

PRINCIPAL_KINDS: Final = ("cli", "agent", "projector", "router")

# A subject token we build from user-supplied text must never contain '.', '*', '>' or
# whitespace, or it would change the meaning of the subject (and of permissions).
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,47}$"
SKILL_PATTERN: Final = r"^[a-z0-9][a-z0-9-]{0,31}(\.[a-z0-9][a-z0-9-]{0,31}){0,3}$"
ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"
_NAME = re.compile(NAME_PATTERN)
_SKILL = re.compile(SKILL_PATTERN)


class SubjectError(ValueError):
    """A name cannot be used to build a subject."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a message, as read from the ingress subject.

    The kind and the name are two subject tokens because NATS permissions match whole
    tokens only: ``in.agent.*.>`` (every agent) and ``in.agent.echo-1.>`` (one agent)
    can both be granted, which ``in.agent-echo-1.>`` would not allow.
    """

    kind: str
    name: str

    @property
    def token(self) -> str:
        """The principal as one word, ``<kind>-<name>``, as the audit log records it."""
        return f"{self.kind}-{self.name}"

    def __str__(self) -> str:
        return self.token


def token(value: str, what: str = "token") -> str:
    """Return ``value`` if it is safe as one subject token, else raise :class:`SubjectError`."""
    if not _TOKEN.match(value):
        raise SubjectError(f"{what} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
    return value


def check_name(value: str, what: str = "name") -> str:
    """Validate an agent or user name (lowercase, digits, '_' and '-')."""
    if not _NAME.match(value):
        raise SubjectError(f"{what} {value!r} must match {NAME_PATTERN}")
    return value


def check_skill(value: str) -> str:
    """Validate a skill name: dotted lowercase words, e.g. ``echo`` or ``llm.chat``."""
    if not _SKILL.match(value):
        raise SubjectError(f"skill {value!r} must match {SKILL_PATTERN}")
    return value


def principal(kind: str, name: str) -> Principal:
    """Build a principal, validating both parts."""
    if kind not in PRINCIPAL_KINDS:
        raise SubjectError(f"principal kind {kind!r} is not one of {', '.join(PRINCIPAL_KINDS)}")
    check_name(name, f"{kind} name")
    return Principal(kind, name)


def parse_principal(tok: str) -> Principal:
    """Read a principal back from its ``<kind>-<name>`` form."""
    kind, _, name = tok.partition("-")
    return principal(kind, name)


def ingress(who: Principal, kind: str) -> str:
    """The subject a principal publishes a message of ``kind`` on."""
    return f"in.{who.kind}.{who.name}.{token(kind, 'kind')}"


@functools.lru_cache(maxsize=4096)
def parse_ingress(subject: str) -> tuple[Principal, str]:
    """Split an ingress subject into the principal and the (unvalidated) kind token.

    Remembered for the last 4,096 subjects (a :class:`Principal` is immutable): the
    router reads every message's, from a few senders and kinds, and validating both
    names took 3 µs of the 4 its subject check cost. A subject that does not parse
    raises each time."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != "in":
        raise SubjectError(f"{subject!r} is not an ingress subject in.<principal kind>.<name>.<kind>")
    return principal(parts[1], parts[2]), token(parts[3], "kind")


def audit(verdict: str, kind: str, key: str) -> str:
    """The subject of one audit record; ``key`` is the aggregate (task id, agent name)."""
    return f"audit.{token(verdict, 'verdict')}.{token(kind, 'kind')}.{token(key, 'key')}"


def audit_for_key(key: str) -> str:
    """A filter matching every audit record of one aggregate, whatever its verdict or kind."""
    return f"audit.*.*.{token(key, 'key')}"


def work(skill: str) -> str:
    """The subject tasks for ``skill`` are dispatched on."""
    return f"work.{check_skill(skill)}"


def work_consumer(skill: str) -> str:
    """The durable consumer shared by every agent replica that has ``skill``.

    Consumer names may not contain '.', and skill names may not contain '_', so the
    mapping is one to one.
    """
    return "skill-" + check_skill(skill).replace(".", "_")


def assigned(agent: str, skill: str) -> str:
    """The subject of work assigned to ``agent`` (every live instance of it) for ``skill``."""
    return f"assign.{check_name(agent, 'agent name')}.{check_skill(skill)}"


def assigned_all(agent: str) -> str:
    """Every subject :func:`assigned` makes for ``agent``: its one consumer's filter."""
    return f"assign.{check_name(agent, 'agent name')}.{FULL_WILDCARD}"


def assigned_consumer(agent: str) -> str:
    """The durable consumer of the work assigned to ``agent``, shared by its instances
    (agent names are unique and may not contain '.', so the mapping is one to one)."""
    return "assigned-" + check_name(agent, "agent name")


def work_msg_id(task_id: str, dispatch: int = 1) -> str:
    """The JetStream de-duplication id of a task's dispatch, so a re-dispatch is a no-op
    (a retry is a new dispatch, with its own id)."""
    base = f"work-{token(task_id, 'task id')}"
    return base if dispatch == 1 else f"{base}#{dispatch}"


def traces(trace_id: str, principal: str) -> str:
    """Where ``principal`` publishes the finished spans of trace ``trace_id`` (32 hex)."""
    return f"traces.{token(trace_id, 'trace id')}.{token(principal, 'principal')}"


def traces_of(trace_id: str) -> str:
    """Every span of one trace, whoever published it."""
    return f"traces.{token(trace_id, 'trace id')}.*"


def metrics(principal: str, instance: str) -> str:
    """Where one process of ``principal`` (``instance``: its own random id, so replicas of
    one agent, or a standby router, keep a snapshot each) publishes its metrics."""
    return f"metrics.{token(principal, 'principal')}.{token(instance, 'instance')}"


def parse_metrics(subject: str) -> tuple[str, str]:
    """The ``(principal, instance)`` a METRICS subject names."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != "metrics":
        raise SubjectError(f"{subject!r} is not a metrics subject metrics.<principal>.<instance>")
    return token(parts[1], "principal"), token(parts[2], "instance")


def notify(who: Principal, topic: str) -> str:
    """Where the router tells a principal something directly (core NATS, not stored):
    ``notify.agent.<name>.claim`` (the verdict on its claims), ``….cancel`` (stop a task)."""
    return f"notify.{who.kind}.{who.name}.{token(topic, 'topic')}"


def notify_all(who: Principal) -> str:
    """Everything the router tells one principal."""
    return f"notify.{who.kind}.{who.name}.>"


NOTIFY_ALL: Final = "notify.>"


def query(projection: str, op: str) -> str:
    """The request subject of a projector query."""
    return f"q.{token(projection, 'projection')}.{token(op, 'op')}"


QUERY_ALL: Final = "q.>"


def kv_stream(bucket: str) -> str:
    """The stream JetStream keeps a KV bucket in."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    """The subject a KV bucket stores ``key`` under (what a put publishes on)."""
    return f"$KV.{bucket}.{key}"


def obj_stream(bucket: str) -> str:
    """The stream JetStream keeps an object store bucket in."""
    return f"OBJ_{bucket}"


def obj_all(bucket: str) -> str:
    """Every subject of an object store bucket: its chunks (``C``) and its entries (``M``)."""
    return f"$O.{bucket}.>"


def obj_chunks(bucket: str) -> str:
    """The prefix of an object store bucket's chunk subjects (``<prefix><object nuid>``)."""
    return f"$O.{bucket}.C."


def obj_meta(bucket: str, name: str) -> str:
    """The subject that holds the entry (name, size, digest, chunks' id) of object ``name``."""
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


def llm_call(call: str) -> str:
    """Where a recorded LLM call is stored: its content hash is the subject's last token."""
    return f"llmcalls.{token(call, 'call')}"


def heartbeat_key(agent: str, suffix: str) -> str:
    """The ``agents`` bucket key of one instance of ``agent``: ``<name>.<suffix>``, so the
    agent's permissions can cover its own instances' keys (:func:`heartbeat_keys`) and no
    other agent's."""
    return f"{check_name(agent, 'agent name')}.{token(suffix, 'instance suffix')}"


def heartbeat_keys(agent: str) -> str:
    """Every ``agents`` bucket key :func:`heartbeat_key` makes for ``agent``."""
    return f"{check_name(agent, 'agent name')}.{FULL_WILDCARD}"


# Wildcards, for the patterns below that grant or filter more than one subject.
WILDCARD: Final = "*"
"""Matches any one token."""
FULL_WILDCARD: Final = ">"
"""Matches one or more tokens, at the end of a pattern only."""


def ingress_all(who: Principal) -> str:
    """Everything one principal may send: ``in.<kind>.<name>.>``."""
    return f"in.{who.kind}.{who.name}.{FULL_WILDCARD}"


def traces_by(principal: str) -> str:
    """Every span batch ``principal`` publishes, whatever the trace (:func:`traces`)."""
    return f"traces.{WILDCARD}.{token(principal, 'principal')}"


def metrics_by(principal: str) -> str:
    """Every snapshot subject ``principal`` publishes on, whatever the instance (:func:`metrics`)."""
    return f"metrics.{token(principal, 'principal')}.{WILDCARD}"


def inbox_prefix(user: str) -> str:
    """The private inbox prefix of NATS user ``user``: replies to it come only there."""
    return f"_INBOX_{token(user, 'user')}"


def inbox_all(user: str) -> str:
    """Every reply subject under :func:`inbox_prefix`."""
    return f"{inbox_prefix(user)}.{FULL_WILDCARD}"


# The JetStream API and its flow subjects, as permissions name them: the API subject of
# an operation followed by the tokens it addresses (a stream, a consumer, a filter, or a
# wildcard). https://docs.nats.io/reference/reference-protocols/nats_api_reference

JS_API_ALL: Final = "$JS.API.>"
"""Every JetStream API operation: stream and consumer management (admin only)."""
JS_API_INFO: Final = "$JS.API.INFO"
"""The account's JetStream information, which every client library asks first."""
JS_ACK_ALL: Final = "$JS.ACK.>"
JS_FC_ALL: Final = "$JS.FC.>"
"""Flow control replies, which push and ordered consumers send."""


def _api(operation: str, stream: str, rest: tuple[str, ...]) -> str:
    return ".".join(("$JS.API", operation, stream, *rest))


def js_stream_info(stream: str) -> str:
    """Read a stream's configuration and state (``stream`` may be :data:`WILDCARD`)."""
    return _api("STREAM.INFO", stream, ())


def js_stream_create(stream: str) -> str:
    """Create ``stream``."""
    return _api("STREAM.CREATE", stream, ())


def js_stream_update(stream: str) -> str:
    """Change ``stream``'s configuration."""
    return _api("STREAM.UPDATE", stream, ())


def js_stream_msg_get(stream: str) -> str:
    """Read one message of ``stream`` by sequence or last-by-subject."""
    return _api("STREAM.MSG.GET", stream, ())


JS_STREAM_NAMES: Final = "$JS.API.STREAM.NAMES"
"""Which stream holds a subject (what nats-py asks before it reads an object store)."""


def js_stream_purge(stream: str) -> str:
    """Purge ``stream`` (or, with a subject filter in the request, part of it)."""
    return _api("STREAM.PURGE", stream, ())


def js_stream_msg_delete(stream: str) -> str:
    """Delete one message of ``stream``."""
    return _api("STREAM.MSG.DELETE", stream, ())


def js_direct_get(stream: str, *rest: str) -> str:
    """Direct get from ``stream`` (``rest``: the subject asked for, as last-by-subject does)."""
    return _api("DIRECT.GET", stream, rest)


def js_consumer_create(stream: str, *rest: str) -> str:
    """Create a consumer on ``stream``: bare (an ephemeral, old API), or ``rest`` = the
    consumer's name and, for a filtered one, its filter subject."""
    return _api("CONSUMER.CREATE", stream, rest)


def js_consumer_durable_create(stream: str, *rest: str) -> str:
    """Create a durable consumer on ``stream`` (the older API; ``rest``: its name)."""
    return _api("CONSUMER.DURABLE.CREATE", stream, rest)


def js_consumer_info(stream: str, *rest: str) -> str:
    """Read a consumer's state (``rest``: its name)."""
    return _api("CONSUMER.INFO", stream, rest)


def js_consumer_list(stream: str) -> str:
    """Read the state of every consumer of ``stream`` (a page at a time)."""
    return _api("CONSUMER.LIST", stream, ())


def js_consumer_delete(stream: str, *rest: str) -> str:
    """Delete a consumer (``rest``: its name)."""
    return _api("CONSUMER.DELETE", stream, rest)


def js_consumer_next(stream: str, *rest: str) -> str:
    """Pull the next messages of a pull consumer (``rest``: its name)."""
    return _api("CONSUMER.MSG.NEXT", stream, rest)


def js_ack(stream: str, *rest: str) -> str:
    """Acknowledge messages of ``stream`` (``rest``: the consumer, and usually a wildcard
    for the delivery tokens that follow)."""
    return ".".join(("$JS.ACK", stream, *rest))

