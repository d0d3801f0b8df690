"""Property: whatever principals send, the router never crashes, every message gets exactly
one audit record, the chain verifies, and only accepted submissions reach WORK."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledgerbus.bus import chain, codec, subjects
from ledgerbus.bus.connection import connect
from ledgerbus.bus.events import EVENT_KINDS, TaskSubmitted
from ledgerbus.bus.server import NatsServer
from ledgerbus.bus.settings import Settings
from tests.conftest import RunningRouter
from tests.support import auth_dir, server_config, stored_audit, wait_until, work_count

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=24)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
fields = st.sampled_from(["id", "task_id", "skill", "input", "timeout_s", "attempt", "output", "error", "message",
                          "fraction", "instance", "skills", "concurrency", "reason", "sender", "kind"])
kind_tokens = st.sampled_from([*EVENT_KINDS, "task_exploded", "unknown"])

wrong_but_well_formed = st.builds(
    lambda kind, body: json.dumps({"kind": kind, **body}).encode(), kind_tokens, st.dictionaries(fields, json_values, max_size=6)
)
valid_submission = st.builds(
    lambda n: codec.encode(TaskSubmitted(id=f"m{n}", task_id=f"t{n}", skill="echo", input={"n": n})),
    st.integers(0, 50),
)
# Raw bytes spliced into a JSON string: invalid UTF-8 where a parser expects text.
bytes_in_a_string = st.builds(
    lambda raw, field: b'{"kind":"task_submitted","id":"m","task_id":"t","skill":"echo","' + field + b'":"' + raw + b'"}',
    st.binary(min_size=1, max_size=8), st.sampled_from([b"id", b"skill", b"note"]),
)
bodies = st.one_of(st.binary(max_size=300), wrong_but_well_formed, valid_submission, bytes_in_a_string)
messages = st.lists(st.tuples(st.sampled_from(["cli", "agent"]), kind_tokens, bodies), min_size=1, max_size=30)


async def scenario(batch: list[tuple[str, str, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = server_config(Path(tmp) / "conf")
        async with NatsServer(Path(tmp) / "js", config=config) as server:
            s = Settings(url=server.url, connect_timeout_s=10, auth_dir=auth_dir(config),
                         policy_path=Path(tmp) / "policy.toml", router_key_path=Path(tmp) / "router.key")
            conns = {"router": await connect(s, "router"), "admin": await connect(s, "admin")}
            for role in ("cli", "agent"):
                user = f"harness-{role}"
                conns[role] = await connect(s.replace(user=user, password=f"{user}-pw"), role)
            router = RunningRouter(conns["router"], s)
            await router.start()
            assert router._task is not None
            try:
                for role, kind, body in batch:
                    who = subjects.principal(role, "prop")
                    await conns[role].jetstream().publish(subjects.ingress(who, kind), body)
                js = conns["admin"].jetstream()

                async def all_recorded() -> bool:
                    return (await js.stream_info(subjects.AUDIT_STREAM)).state.last_seq >= len(batch)

                await wait_until(all_recorded, timeout=30)
                assert not router._task.done(), "the router must still be serving"
                stored = await stored_audit(js)
                assert len(stored) == len(batch), "exactly one record per message"
                assert chain.verify(stored).seq == len(batch)
                records = [codec.decode_record(data) for _, data in stored]
                accepted_submissions = [r for r in records if r.accepted and r.kind == "task_submitted"]
                assert await work_count(js) == len(accepted_submissions)
                assert all(r.verdict in ("accepted", "rejected") and (r.accepted or r.code != "ok") for r in records)
            finally:
                await router.stop()
                for nc in conns.values():
                    await nc.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_any_input_yields_one_record_per_message_and_the_router_lives(batch: list[Any]) -> None:
    asyncio.run(scenario(batch))
