"""One trace per task across every process, seen two ways: over OTLP/HTTP by a receiver
the test runs (decoding the real exporters' protobuf), and on the TRACES stream through
``agentctl trace``. Also: the logs join the trace, and with no endpoint nothing is sent.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from nats.aio.client import Client

from ledgerbus.bus.settings import Settings
from tests.fakellm import FakeLLM, answer
from tests.otlp import OTLPReceiver, ReceivedSpan
from tests.support import Procs, agentctl, audit_records, wait_for_record, wait_until
from tests.test_e2e import joined
from tests.test_llm_skills_e2e import fake  # noqa: F401 - the fixture: a fake Anthropic API
from tests.test_shell_e2e import POLICY

PLAN = """\
name: traced
steps:
  - {id: greet, skill: echo, input: {text: hello}}
  - {id: list, skill: shell, input: {argv: [echo, traced]}, deps: [greet]}
  - {id: think, skill: llm.chat, input: {prompt: "Say hi"}, deps: [greet]}
"""


def otel_env(receiver: OTLPReceiver) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "500"}


async def start_traced_system(procs: Procs, admin: Client, env: dict[str, str]) -> None:
    await procs.start("router", "router", **env)
    await procs.start("projector", "projector", **env)
    # At debug: a completed task's `task_finished` line is a debug line.
    await procs.start("echo-1", "agent", "--name", "echo-1", "--skills", "echo", **env, LEDGERBUS_LOG_LEVEL="debug")
    await procs.start("runner-1", "agent", "--name", "runner-1", "--skills", "shell,python", **env)
    await procs.start("thinker-1", "agent", "--name", "thinker-1", "--skills", "llm.chat", **env)
    for name in ("echo-1", "runner-1", "thinker-1"):
        await wait_for_record(admin.jetstream(), joined(name))


def assert_one_tree(spans: list[ReceivedSpan]) -> ReceivedSpan:
    """Every span but one has its parent among the spans; return the root."""
    ids = {s.span_id for s in spans}
    assert len(ids) == len(spans), "a span was exported twice"
    roots = [s for s in spans if not s.parent_span_id]
    orphans = [s for s in spans if s.parent_span_id and s.parent_span_id not in ids]
    assert len(roots) == 1, [(s.service, s.name) for s in roots]
    assert not orphans, [(s.service, s.name, s.parent_span_id) for s in orphans]
    return roots[0]


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


async def test_one_plan_is_one_trace_across_every_process(procs: Procs, settings: Settings, admin: Client,
                                                          tmp_path: Path, fake: FakeLLM) -> None:  # noqa: F811
    settings.policy_path.write_text(POLICY)
    fake.push(answer("hi"))
    with OTLPReceiver() as receiver:
        env = otel_env(receiver)
        await start_traced_system(procs, admin, env)
        plan = tmp_path / "plan.yaml"
        plan.write_text(PLAN)
        code, out, err = await agentctl(settings, "submit", "--plan", str(plan), "--task-id", "traced", "--wait",
                                        "--json", env=env)
        assert code == 0, err
        assert json.loads(out)["status"] == "completed"
        # A task id that is taken: INGRESS takes the message, the router rejects it.
        code, out, err = await agentctl(settings, "submit", "echo", "--task-id", "traced", "--json", env=env)
        assert code == 0, err

        records = await audit_records(admin.jetstream())
        plan_trace = next(r.trace_id for r in records if r.key == "traced" and r.kind == "plan_submitted")
        refused = next(r for r in records if r.key == "traced" and r.kind == "task_submitted")
        assert refused.verdict == "rejected"
        # Everything the plan did carries its trace in the log, the steps' records too.
        assert {r.trace_id for r in records if r.key.startswith("traced") and r != refused} == {plan_trace}

        # The projector applies the last record after the CLI saw it: wait for its span.
        async def applied() -> bool:
            return any(s.name == "projector.apply" and s.attributes["ledgerbus.audit.seq"] == records[-1].seq
                       for s in receiver.spans)

        await wait_until(applied, what="the projector's span of the last record")
        await procs.stop_all()  # each process flushes its exporters on the way out

    spans = receiver.trace(plan_trace)
    root = assert_one_tree(spans)
    assert (root.service, root.name) == ("agentctl", "agentctl.submit")
    services = {s.service for s in spans}
    assert {"agentctl", "ledgerbus-router", "ledgerbus-projector", "ledgerbus-agent-echo-1",
            "ledgerbus-agent-runner-1", "ledgerbus-agent-thinker-1"} <= services
    names = {s.name for s in spans}
    assert {"router.process", "agent.run", "projector.apply", "shell.exec"} <= names
    # One span per hop: a check that passes, the append and the publish to WORK are parts
    # of their message's router.process, not spans of their own.
    assert not {n for n in names if n.startswith(("router.check", "audit.append", "router.dispatch", "skill.run"))}
    assert "router.decide task_dispatched" in names

    # The hops link up as the message went: submit -> router -> decide -> agent.
    [process] = children(spans, root)
    assert process.name == "router.process" and process.kind == 5  # CONSUMER
    assert process.attributes["messaging.system"] == "nats"
    # The message id travels: the CLI's event id is what the router processed.
    assert process.attributes["messaging.message.id"] == root.attributes["messaging.message.id"]
    assert process.attributes["messaging.destination.name"] == root.attributes["messaging.destination.name"]
    assert process.attributes["ledgerbus.verdict"] == "accepted"
    assert process.attributes["ledgerbus.task_id"] == "traced"
    by_id = {s.span_id: s for s in spans}
    runs = {s.attributes["ledgerbus.task_id"]: s for s in spans if s.name == "agent.run"}
    assert set(runs) == {"traced-greet", "traced-list", "traced-think"}
    decides = {}
    for task_id, run in runs.items():
        decides[task_id] = by_id[run.parent_span_id]
        assert decides[task_id].name == "router.decide task_dispatched"
        assert decides[task_id].attributes["ledgerbus.task_id"] == task_id

    def completion(task_id: str) -> ReceivedSpan:
        return next(s for s in spans if s.name == "router.process" and s.attributes["ledgerbus.task_id"] == task_id
                    and s.attributes["ledgerbus.kind"] == "task_completed")

    # Each decision is a child of its cause: the plan dispatches its first step, the first
    # step's completion the second, the second's completion ends the plan.
    assert decides["traced-greet"].parent_span_id == process.span_id
    assert decides["traced-list"].parent_span_id == completion("traced-greet").span_id
    assert decides["traced-think"].parent_span_id == completion("traced-greet").span_id
    [done] = [s for s in spans if s.name == "router.decide task_completed"]
    assert done.parent_span_id in {completion("traced-list").span_id, completion("traced-think").span_id}
    assert runs["traced-greet"].attributes["ledgerbus.agent"] == "echo-1"
    assert runs["traced-greet"].attributes["messaging.message.id"] == "work-traced-greet"
    # A plan step is assigned to the agent it was matched to: its queue, not the skill's.
    assert runs["traced-greet"].attributes["messaging.destination.name"] == "assign.echo-1.echo"
    shell = next(s for s in spans if s.name == "shell.exec")
    assert by_id[shell.parent_span_id] == runs["traced-list"]
    assert shell.attributes["process.executable.name"] == "echo"
    # The LLM call is a client span under the skill, with its model and tokens.
    [llm] = [s for s in spans if s.name == "llm.chat"]
    assert llm.kind == 3 and by_id[llm.parent_span_id] == runs["traced-think"]
    assert llm.attributes["gen_ai.system"] == "anthropic" and llm.attributes["gen_ai.request.model"] == "fake-model"
    assert llm.attributes["gen_ai.usage.input_tokens"] > 0 and llm.attributes["gen_ai.usage.output_tokens"] == 1
    # The agents' reports come back through the router, into the projector.
    completions = [s for s in spans if s.name == "router.process" and s.attributes["ledgerbus.kind"] == "task_completed"]
    assert {by_id[c.parent_span_id].name for c in completions} == {"agent.run"}
    assert any(by_id[s.parent_span_id] in completions for s in spans if s.name == "projector.apply")

    # A rejected message's trace shows the check that failed it.
    rejected = receiver.trace(refused.trace_id)
    assert_one_tree(rejected)
    failing = [s for s in rejected if s.name.startswith("router.check") and s.status_code == 2]
    assert [s.attributes["ledgerbus.code"] for s in failing] == [refused.code]
    assert refused.code in failing[0].status_message

    # Metrics went out on the same settings.
    assert {"ledgerbus.router.messages", "ledgerbus.skill.duration", "ledgerbus.projector.records", "ledgerbus.tasks",
            "gen_ai.client.token.usage", "gen_ai.client.operation.duration"} <= receiver.metric_names

    # The same tree from the TRACES stream, with no collector at all.
    code, out, err = await agentctl(settings, "trace", "traced", "--json")
    assert code == 0, err
    otlp = json.loads(out)
    from_bus = {(s["spanId"], s.get("parentSpanId", ""), s["name"])
                for rs in otlp["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]}
    assert from_bus == {(s.span_id, s.parent_span_id, s.name) for s in spans}
    assert all(s["traceId"] == plan_trace for rs in otlp["resourceSpans"] for ss in rs["scopeSpans"]
               for s in ss["spans"])

    code, out, err = await agentctl(settings, "trace", "traced")
    assert code == 0, err
    assert "critical path" in out and "agent.run" in out and "shell.exec" in out
    code, out, err = await agentctl(settings, "trace", refused.trace_id)
    assert code == 0, err
    assert refused.code in out

    # Every log line an agent wrote while running a step names the trace, span and task.
    agent_log = next(p for p in procs.started if p.name == "echo-1").log_lines()
    finished = [line for line in agent_log if line.get("event") == "task_finished"]
    assert finished and all(line["trace_id"] == plan_trace and line["task_id"] == "traced-greet"
                            and line["agent"] == "echo-1" and len(line["span_id"]) == 16 for line in finished)


@contextmanager
def listening(port: int) -> Iterator[list[int] | None]:
    """Count connections to ``127.0.0.1:port`` (None if the port is taken here)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        yield None
        return
    sock.listen()
    sock.settimeout(0.2)
    accepted: list[int] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield accepted
    finally:
        done.set()
        thread.join()
        sock.close()


async def test_with_no_endpoint_nothing_is_sent_anywhere(procs: Procs, settings: Settings, admin: Client) -> None:
    # The OTLP defaults are localhost:4318 (HTTP) and :4317 (gRPC): listen there and
    # check that a whole run, traced to TRACES as always, never knocks.
    with listening(4318) as http, listening(4317) as grpc:
        if http is None and grpc is None:
            pytest.skip("ports 4317 and 4318 are both in use on this machine")
        await start_traced_system(procs, admin, {})
        code, _, err = await agentctl(settings, "submit", "echo", "--input", '{"text": "quiet"}', "--wait",
                                        "--json", "--task-id", "quiet")
        assert code == 0, err
        await procs.stop_all()
        code, _, err = await agentctl(settings, "trace", "quiet", "--json")
        assert code == 0, err  # traced all the same, on the bus
        assert http in ([], None) and grpc in ([], None)
