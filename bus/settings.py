"""Process settings, read once from the environment (``LEDGERBUS_*``) at start.

Every value has a default that works with ``honcho start`` on one machine; command-line
options in ``agentctl`` override the environment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.home import find_home

DEFAULT_URL = "nats://127.0.0.1:4222"

KEEP_WORKSPACES = ("none", "failed", "all")
TRACE_CHECKS = ("all", "failed")
MAX_REPLICAS = 5
"""JetStream keeps at most five copies of a stream."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a ledgerbus process needs to know about its environment."""

    home: Path | None = None
    """The project directory (:mod:`bus.home`) the relative paths below were resolved
    against by :meth:`from_env`; ``None`` outside any project (they stay relative)."""
    url: str = DEFAULT_URL
    user: str | None = None
    password: str | None = None
    auth_dir: Path = Path("var/auth")
    """The principals' registry and credentials (``agentctl keys``; made by ``agentctl nats``)."""
    db_path: Path = Path("var/ledgerbus.db")
    policy_path: Path = Path("policy.toml")
    profiles_path: Path = Path("profiles.toml")
    """Agent profiles (``agentctl agent --profile NAME``), and where approved proposals are saved."""
    llm_config_path: Path = Path("llm.toml")
    """The LLM routing file: providers, models and fallbacks by skill and role (docs/skills.md)."""
    workspace_root: Path = Path("var/workspaces")
    """Where agents make each task's workspace (``<root>/<agent>/<task id>/<attempt>``)."""
    keep_workspaces: str = "failed"
    """Which task workspaces stay after the task ends: ``none``, ``failed`` or ``all``."""
    policy_check_interval_s: float = 1.0
    router_key_path: Path = Path("var/keys/router.key")
    checkpoint_every: int = 1000
    checkpoint_interval_s: float = 60.0
    snapshot_every: int = 10_000
    """The router saves a snapshot of its state every this many audit records, and starts
    (or takes over) from the newest valid one plus the records after it; 0: never, every
    start folds the whole log (docs/operations.md, "Router snapshots")."""
    snapshot_keep: int = 3
    """How many snapshots the router keeps, the newest and the ones before it (a damaged
    newest one is passed over for the one before)."""
    projection_snapshot_every: int = 10_000
    """The projector saves a snapshot of its database every this many audit records (to the
    ``projections`` object store); a projector with no database file, and ``agentctl
    replay``, start from the newest one that checks plus the records after it; 0: never
    saved (docs/operations.md, "Projection snapshots")."""
    projection_snapshot_keep: int = 3
    """How many projection snapshots are kept, the newest and the ones before it."""
    max_message_bytes: int = 256 * 1024
    llm_record_max_bytes: int = 1024 * 1024
    """The largest recorded LLM call (request and answer, ``agents/llm/calls.py``): a bigger
    one keeps its request hash but drops the request's text, then the answer's, and says so."""
    llm_calls_max_age_s: float = 97 * 86400.0
    """How long recorded LLM calls are kept (the LLMCALLS stream's max age): as long as the
    log's records that name them, by default ``audit_max_age`` + ``archive_max_age`` (7 + 90
    days); the leader router sets it from ``[retention]`` in the policy."""
    duplicate_window_s: float = 120.0
    dedup_horizon_s: float = 24 * 3600.0
    dedup_max_ids: int = 200_000
    """The most accepted message ids the router remembers for ``duplicate_message`` within the
    horizon (the oldest are forgotten first): about 300 bytes each, so the horizon bounds
    the router's memory by time and this by size, whatever the traffic."""
    ingress_ack_wait_s: float = 30.0
    router_batch: int = 256
    router_lease_s: float = 10.0
    """The leader lease: a standby router takes over this long after the leader stops renewing."""
    work_ack_wait_s: float = 30.0
    work_max_deliver: int = 5
    heartbeat_interval_s: float = 5.0
    agents_ttl_s: float = 30.0
    drain_timeout_s: float = 30.0
    claim_timeout_s: float = 30.0
    """How long an agent waits for the router's verdict on a claim before handing the task back."""
    claim_after_s: float = 0.05
    """How long a skill that runs before its claim (``claim_first = False``) may run before
    the agent sends the claim; one that finishes sooner sends its result with its claim."""
    projector_batch: int = 512
    projector_linger_s: float = 0.01
    """How long the projector waits, after a record that finds fewer than a batch queued, for
    more to join it, while records have been coming at 50 a second or more: at a steady
    trickle (one task at a time) one commit then folds the records of several tasks instead
    of one each, and the projector's wake-ups stop competing with the task path for the CPU.
    A record after a quiet moment is not held. It adds at most this much to the projection's
    lag; 0: none."""
    traces_max_age_s: float = 3600.0
    """How long finished spans stay in the TRACES stream (``agentctl trace``)."""
    traces_max_bytes: int = 256 * 1024 * 1024
    """The TRACES stream's size cap: the oldest spans go first."""
    metrics_interval_s: float = 10.0
    """How often each process publishes its metrics snapshot to METRICS (the gateway's
    ``/metrics`` drops one older than three of these: its process is gone)."""
    trace_checks: str = "failed"
    """Which router checks get a span: only the one that ``failed`` a message, or ``all``
    (one span per check: a debugging aid, most of what tracing would cost the router)."""
    memory_list_cap: int = 1000
    """Most entries an agent's observation or reasoning list keeps; older ones roll into a summary."""
    max_checkpoint_bytes: int = 64 * 1024
    """Largest agent state blob a memory checkpoint may carry."""
    connect_timeout_s: float = 30.0
    gc_gen0: int = 20_000
    """After start-up, a long-running process (router, agent, projector) collects its youngest
    garbage generation every this many allocations (``bus/heap.py``): fewer, longer pauses
    and less time collecting than CPython's 700, which this restores."""
    stream_replicas: int = 1
    """Copies JetStream keeps of every stream and bucket: 1 on one server, 3 on a three-node
    cluster (docs/deployment.md), so that losing one server loses no acknowledged write."""

    @property
    def servers(self) -> list[str]:
        """The server URLs (``LEDGERBUS_URL`` may list several, comma-separated)."""
        return [u.strip() for u in self.url.split(",") if u.strip()]

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied; ``None`` values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``LEDGERBUS_<FIELD>`` for every field; malformed values raise ConfigError."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "home":
                continue
            raw = env.get(f"LEDGERBUS_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            default = f.default
            try:
                # bool is not a setting here; int before float because the defaults say which.
                if isinstance(default, Path):
                    values[f.name] = Path(raw)
                elif isinstance(default, int):
                    values[f.name] = int(raw)
                elif isinstance(default, float):
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise ConfigError(f"LEDGERBUS_{f.name.upper()}={raw!r}: {exc}") from exc
        if values.get("trace_checks", "failed") not in TRACE_CHECKS:
            raise ConfigError(f"LEDGERBUS_TRACE_CHECKS={values['trace_checks']!r}: one of {', '.join(TRACE_CHECKS)}")
        keep = values.get("keep_workspaces")
        if keep is not None and keep not in KEEP_WORKSPACES:
            raise ConfigError(f"LEDGERBUS_KEEP_WORKSPACES={keep!r}: one of {', '.join(KEEP_WORKSPACES)}")
        replicas = values.get("stream_replicas", 1)
        if not 1 <= replicas <= MAX_REPLICAS:
            raise ConfigError(f"LEDGERBUS_STREAM_REPLICAS={replicas}: from 1 to {MAX_REPLICAS} "
                              "(1 on one server, 3 on a three-node cluster)")
        if values.get("gc_gen0", 1) < 1:
            raise ConfigError(f"LEDGERBUS_GC_GEN0={values['gc_gen0']}: a number of allocations, 1 or more "
                              "(700 is CPython's own)")
        if not values.get("metrics_interval_s", 1.0) > 0:
            raise ConfigError(f"LEDGERBUS_METRICS_INTERVAL_S={values['metrics_interval_s']}: a number of seconds above 0")
        return cls(**values).at_home(find_home(env=env))

    def at_home(self, home: Path | None) -> Settings:
        """A copy whose relative paths resolve against the project ``home``."""
        if home is None:
            return self
        moved: dict[str, Any] = {f.name: home / value for f in dataclasses.fields(self)
                 if isinstance(value := getattr(self, f.name), Path) and not value.is_absolute()}
        return dataclasses.replace(self, home=home, **moved)

    def in_home(self, path: Path) -> Path:
        """``path`` resolved against the project, if there is one."""
        return path if self.home is None or path.is_absolute() else self.home / path
