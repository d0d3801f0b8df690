"""LLM providers and routing, through the real Anthropic and OpenAI SDKs against the fake
APIs of tests/fakellm.py: answers, structured output, fallback on every retryable
failure, usage and spans per attempt, routing by role and skill, configuration errors,
and keys that never show. No key, no GPU, no network."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, Tracer

from ledgerbus.agents.llm import ChatRequest, LLMRouter, Message, ProviderError, Usage
from ledgerbus.agents.llm import config as llm_config
from ledgerbus.agents.llm.anthropic import AnthropicProvider
from ledgerbus.agents.llm.base import Provider
from ledgerbus.agents.llm.openai_compat import OpenAIProvider
from ledgerbus.bus.errors import ConfigError
from tests.fakellm import FakeLLM, Reply, answer, hang, malformed, status

SECRET = "sk-ant-test-0123456789-never-show-me"
REPO = Path(__file__).resolve().parent.parent
SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "steps": {"type": "array"}},
          "required": ["title", "steps"]}


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """A known Anthropic key, and no vLLM key (whatever the developer's shell has)."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeLLM]]:
    """``fakes(*replies)``: a running fake API with that script, stopped after the test."""
    with contextlib.ExitStack() as running:
        yield lambda *script: running.enter_context(FakeLLM(*script))


@pytest.fixture
def spans() -> tuple[Tracer, InMemorySpanExporter]:
    """A tracer whose spans land in memory (not the global provider)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("ledgerbus.llm"), exporter


class Usages:
    """A usage sink that keeps what it is given."""

    def __init__(self) -> None:
        self.seen: list[Usage] = []

    async def __call__(self, usage: Usage) -> None:
        self.seen.append(usage)

    @property
    def outcomes(self) -> list[tuple[str, str, str]]:
        return [(u.provider, u.model, u.outcome) for u in self.seen]


def anthropic(name: str, fake: FakeLLM, timeout_s: float = 2.0) -> str:
    return f'[providers.{name}]\ntype = "anthropic"\nbase_url = "{fake.url}"\ntimeout_s = {timeout_s}\n'


def vllm(name: str, fake: FakeLLM, timeout_s: float = 2.0) -> str:
    return f'[providers.{name}]\ntype = "vllm"\nbase_url = "{fake.openai_url}"\ntimeout_s = {timeout_s}\n'


def route(provider: str, model: str, *fallbacks: tuple[str, str], table: str = "default", extra: str = "") -> str:
    listed = ", ".join(f'{{ provider = "{p}", model = "{m}" }}' for p, m in fallbacks)
    return f'[{table}]\nprovider = "{provider}"\nmodel = "{model}"\nfallbacks = [{listed}]\n{extra}'


def router_for(tmp_path: Path, *tables: str, tracer: Tracer | None = None) -> LLMRouter:
    path = tmp_path / "llm.toml"
    path.write_text("\n".join(tables))
    return LLMRouter.from_file(path, tracer=tracer)


def user(text: str) -> ChatRequest:
    return ChatRequest(messages=[Message(role="user", content=text)])


# -- Providers, through the SDKs -------------------------------------------------------------


async def test_anthropic_answers_with_the_route_parameters_and_the_key(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    fake = fakes(answer("Hello there, planner"))
    async with router_for(tmp_path, anthropic("claude", fake),
                          route("claude", "claude-x", extra="max_tokens = 300\ntemperature = 0.3\n"
                                                             "params = { top_k = 5 }\n")) as router:
        result = await router.bind("plan").chat("say hi to me", system="be brief")
    assert (result.text, result.provider, result.model, result.stop_reason) == (
        "Hello there, planner", "claude", "claude-x", "end_turn")
    assert (result.tokens_in, result.tokens_out) == (6, 3)  # "be brief say hi to me"; the answer
    sent = fake.requests[0]
    assert sent.path == "/v1/messages"
    assert sent.body == {"model": "claude-x", "max_tokens": 300, "system": "be brief", "temperature": 0.3,
                         "top_k": 5, "messages": [{"role": "user", "content": "say hi to me"}]}
    # anthropic 2.x sends the key as a bearer token; older SDKs used x-api-key.
    assert SECRET in (sent.headers.get("x-api-key"), sent.headers.get("authorization", "").removeprefix("Bearer "))


async def test_vllm_puts_the_system_prompt_first_and_sends_empty_without_a_key(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    fake = fakes(answer("Hi"))
    async with router_for(tmp_path, vllm("local", fake), route("local", "qwen")) as router:
        result = await router.bind("plan").chat(
            ChatRequest(system="be brief", messages=[Message(role="user", content="one"),
                                                     Message(role="assistant", content="two"),
                                                     Message(role="user", content="three")], max_tokens=50))
    assert (result.text, result.provider, result.model, result.stop_reason) == ("Hi", "local", "qwen", "stop")
    assert (result.tokens_in, result.tokens_out) == (5, 1)
    sent = fake.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
                                     {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}]
    assert sent.body["max_tokens"] == 50 and "response_format" not in sent.body
    assert sent.headers["authorization"] == "Bearer EMPTY"


async def test_vllm_sends_its_key_when_the_environment_has_one(
    tmp_path: Path, fakes: Callable[..., FakeLLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "vllm-key")
    fake = fakes()
    async with router_for(tmp_path, vllm("local", fake), route("local", "qwen")) as router:
        await router.bind("plan").chat("hi")
    assert fake.requests[0].headers["authorization"] == "Bearer vllm-key"


async def test_anthropic_structured_output_is_a_forced_tool_whose_input_is_the_data(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    plan = {"title": "Ship it", "steps": ["build", "test"]}
    fake = fakes(answer(data=plan))
    async with router_for(tmp_path, anthropic("claude", fake), route("claude", "claude-x")) as router:
        result = await router.bind("plan").chat("plan the release", schema=SCHEMA, schema_name="plan")
    assert result.data == plan and json.loads(result.text) == plan and result.stop_reason == "tool_use"
    body = fake.requests[0].body
    assert body["tools"] == [{"name": "plan", "input_schema": SCHEMA, "description": body["tools"][0]["description"]}]
    assert body["tools"][0]["description"]
    assert body["tool_choice"] == {"type": "tool", "name": "plan"}


async def test_vllm_structured_output_is_a_strict_json_schema_response_format(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    plan = {"title": "Ship it", "steps": ["build"]}
    fake = fakes(answer(data=plan))
    async with router_for(tmp_path, vllm("local", fake), route("local", "qwen")) as router:
        result = await router.bind("plan").chat("plan the release", schema=SCHEMA, schema_name="plan")
    assert result.data == plan and json.loads(result.text) == plan
    assert fake.requests[0].body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "plan", "schema": SCHEMA, "strict": True}}
    assert "tools" not in fake.requests[0].body


async def test_a_structured_anthropic_answer_without_tool_use_is_malformed(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    fake = fakes(answer("I would rather chat"))
    async with router_for(tmp_path, anthropic("claude", fake), route("claude", "claude-x")) as router:
        with pytest.raises(ProviderError, match="no plan tool_use block in the answer") as caught:
            await router.bind("plan").chat("plan it", schema=SCHEMA, schema_name="plan")
    assert caught.value.kind == "malformed"


async def test_vllm_content_that_is_not_json_is_malformed_with_its_first_200_characters(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    prose = "Sure! Here is the plan. " + "x" * 300
    fake = fakes(answer(prose))
    async with router_for(tmp_path, vllm("local", fake), route("local", "qwen")) as router:
        with pytest.raises(ProviderError) as caught:
            await router.bind("plan").chat("plan it", schema=SCHEMA)
    assert caught.value.kind == "malformed"
    assert prose[:200] in str(caught.value) and prose[:201] not in str(caught.value)


# -- Fallback -------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure, kind", [
    (status(429, retry_after=2), "rate_limited"),
    (status(500), "server"),
    (status(529, message="Overloaded"), "server"),
    (hang(0.4), "timeout"),
    (malformed(), "malformed"),
    (malformed('{"unexpected": true}', content_type="application/json"), "malformed"),
    (malformed('{"id": "msg_1", "content": [', content_type="application/json"), "malformed"),
], ids=["429", "500", "529", "timeout", "html", "wrong-shape", "broken-json"])
@pytest.mark.parametrize("primary", ["anthropic", "vllm"])
async def test_a_retryable_failure_falls_back_to_the_next_candidate(
    tmp_path: Path, fakes: Callable[..., FakeLLM], failure: Reply, kind: str, primary: str
) -> None:
    first, second = fakes(failure), fakes(answer("from the fallback"))
    provider = anthropic if primary == "anthropic" else vllm
    usages = Usages()
    async with router_for(tmp_path, provider("first", first, timeout_s=0.2), vllm("second", second),
                          route("first", "model-a", ("second", "model-b"))) as router:
        result = await router.bind("plan", usage=usages).chat("hello")
    assert (result.text, result.provider, result.model) == ("from the fallback", "second", "model-b")
    assert usages.outcomes == [("first", "model-a", kind), ("second", "model-b", "ok")]


async def test_a_rate_limit_carries_the_servers_retry_after(fakes: Callable[..., FakeLLM]) -> None:
    fake = fakes(status(429, retry_after=2), status(429, retry_after=0.5))
    providers: list[Provider] = [AnthropicProvider("claude", base_url=fake.url),
                                 OpenAIProvider("local", base_url=fake.openai_url)]
    for provider, wanted in zip(providers, (2.0, 0.5), strict=True):
        with pytest.raises(ProviderError) as caught:
            await provider.chat(user("hi"), model="m", max_tokens=10, params={})
        await provider.aclose()
        assert (caught.value.kind, caught.value.status, caught.value.retry_after_s) == ("rate_limited", 429, wanted)
        assert str(caught.value).startswith(f"{provider.name}/m: rate_limited (429, retry after {wanted:g}s): ")


async def test_a_refused_request_fails_at_once_without_falling_back(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    first, second = fakes(status(400, message="max_tokens: 999999 > 64000, the maximum")), fakes()
    usages = Usages()
    async with router_for(tmp_path, anthropic("claude", first), vllm("local", second),
                          route("claude", "claude-x", ("local", "qwen"))) as router:
        with pytest.raises(ProviderError) as caught:
            await router.bind("plan", usage=usages).chat("hello")
    assert caught.value.kind == "refused" and caught.value.status == 400
    assert str(caught.value) == "claude/claude-x: refused (400): max_tokens: 999999 > 64000, the maximum"
    assert second.requests == []
    assert usages.outcomes == [("claude", "claude-x", "refused")]


async def test_when_every_candidate_fails_one_error_lists_every_attempt(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    first, second = fakes(status(429, retry_after=2, message="slow down")), fakes(status(500, message="oops"))
    async with router_for(tmp_path, anthropic("claude", first), vllm("local", second),
                          route("claude", "claude-x", ("local", "qwen"))) as router:
        with pytest.raises(ProviderError) as caught:
            await router.bind("plan").chat("hello")
    assert str(caught.value) == ("llm.chat failed: claude/claude-x: rate_limited (429, retry after 2s): slow down;"
                                 " local/qwen: server (500): oops")
    assert (caught.value.kind, caught.value.provider, caught.value.status) == ("server", "local", 500)


async def test_fallbacks_are_tried_exactly_in_order(tmp_path: Path, fakes: Callable[..., FakeLLM]) -> None:
    a, b, c = fakes(status(503)), fakes(hang(0.4)), fakes(answer("third time"))
    usages = Usages()
    async with router_for(tmp_path, vllm("a", a), anthropic("b", b, timeout_s=0.2), vllm("c", c),
                          route("a", "m1", ("b", "m2"), ("c", "m3"))) as router:
        result = await router.bind("plan", usage=usages).chat("hello")
    assert result.text == "third time"
    assert usages.outcomes == [("a", "m1", "server"), ("b", "m2", "timeout"), ("c", "m3", "ok")]
    assert [len(f.requests) for f in (a, b, c)] == [1, 1, 1]


async def test_the_last_candidate_rate_limited_is_retried_once_after_its_wait_capped(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    fake = fakes(status(429, retry_after=30), answer("patience"))
    usages = Usages()
    async with router_for(tmp_path, vllm("local", fake), route("local", "qwen")) as router:
        router.max_retry_wait_s = 0.1
        started = time.monotonic()
        result = await router.bind("plan", usage=usages).chat("hello")
    assert result.text == "patience" and 0.1 <= time.monotonic() - started < 2
    assert usages.outcomes == [("local", "qwen", "rate_limited"), ("local", "qwen", "ok")]


async def test_usage_reports_every_attempt_with_its_tokens_and_cost_from_the_price_table(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    first, second = fakes(status(500)), fakes(answer("four words right here"))
    usages = Usages()
    prices = '[prices."claude-x"]\ninput = 3.0\noutput = 15.0\n[prices."qwen"]\ninput = 0.5\noutput = 1.5\n'
    async with router_for(tmp_path, anthropic("claude", first), vllm("local", second), prices,
                          route("claude", "claude-x", ("local", "qwen"))) as router:
        result = await router.bind("plan", usage=usages).chat("count these three")
    failed, ok = usages.seen
    assert (failed.outcome, failed.tokens_in, failed.tokens_out, failed.cost_usd) == ("server", 0, 0, 0.0)
    assert (ok.outcome, ok.tokens_in, ok.tokens_out) == ("ok", 3, 4)
    assert ok.cost_usd == pytest.approx((3 * 0.5 + 4 * 1.5) / 1_000_000)
    assert failed.latency_s > 0 and ok.latency_s > 0
    assert (result.cost_usd, result.latency_s) == (ok.cost_usd, ok.latency_s)


async def test_a_model_without_a_price_costs_nothing(tmp_path: Path, fakes: Callable[..., FakeLLM]) -> None:
    usages = Usages()
    async with router_for(tmp_path, vllm("local", fakes()), route("local", "unpriced")) as router:
        result = await router.bind("plan", usage=usages).chat("hello")
    assert result.cost_usd == 0.0 and usages.seen[0].cost_usd == 0.0 and usages.seen[0].tokens_in == 1


# -- Routing ------------------------------------------------------------------------------------


async def test_a_role_route_wins_over_a_skill_route_which_wins_over_the_default(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    fake = fakes()
    async with router_for(tmp_path, vllm("local", fake), route("local", "default-model"),
                          route("local", "plan-model", table='skills."plan"'),
                          route("local", "architect-model", table='roles."architect"')) as router:
        for skill, role in (("plan", "architect"), ("review", "architect"), ("plan", "developer"),
                            ("plan", ""), ("review", "developer")):
            await router.bind(skill, role=role).chat("hello")
    assert [r.body["model"] for r in fake.requests] == [
        "architect-model", "architect-model", "plan-model", "plan-model", "default-model"]


async def test_a_fallback_takes_the_routes_max_tokens_and_temperature_unless_it_has_its_own(tmp_path: Path) -> None:
    path = tmp_path / "llm.toml"
    path.write_text('[providers.p]\ntype = "vllm"\nbase_url = "http://127.0.0.1:9/v1"\n'
                    '[default]\nprovider = "p"\nmodel = "a"\nmax_tokens = 300\ntemperature = 0.2\n'
                    'params = { top_p = 0.9 }\n'
                    'fallbacks = [{ provider = "p", model = "b" }, { provider = "p", model = "c", max_tokens = 50,'
                    ' temperature = 0.0, params = { top_k = 3 } }]\n')
    candidates = LLMRouter.from_file(path).route("plan").candidates()
    assert [(c.model, c.max_tokens, c.temperature, c.params) for c in candidates] == [
        ("a", 300, 0.2, {"top_p": 0.9}), ("b", 300, 0.2, {}), ("c", 50, 0.0, {"top_k": 3})]


async def test_without_a_routing_file_agents_start_but_calls_say_what_to_create(tmp_path: Path) -> None:
    router = LLMRouter.from_file(tmp_path / "missing.toml")
    llm = router.bind("plan", role="architect")
    with pytest.raises(ProviderError) as caught:
        await llm.chat("hello")
    assert caught.value.kind == "config"
    message = str(caught.value)
    assert "no LLM route for skill 'plan' (role 'architect')" in message
    assert str(tmp_path / "missing.toml") in message and "LEDGERBUS_LLM_CONFIG_PATH" in message


async def test_a_skill_without_a_route_and_no_default_is_a_config_error(tmp_path: Path) -> None:
    router = router_for(tmp_path, '[providers.p]\ntype = "anthropic"\n', route("p", "m", table='skills."plan"'))
    with pytest.raises(ProviderError, match=r'no LLM route for skill \'llm.chat\'.*\[skills\."llm.chat"\]') as caught:
        await router.bind("llm.chat").chat("hello")
    assert caught.value.kind == "config"


@pytest.mark.parametrize("text, problem", [
    ('[providers.p]\ntype = "anthropic"\n[default]\nprovider = "q"\nmodel = "m"\n',
     "default: unknown provider 'q' (known: p)"),
    ('[providers.p]\ntype = "anthropic"\n[skills."llm.chat"]\nprovider = "p"\nmodel = "m"\n'
     + 'fallbacks = [{ provider = "nope", model = "m" }]\n',
     "skills.\"llm.chat\".fallbacks[0]: unknown provider 'nope' (known: p)"),
    ('[providers.p]\ntype = "anthropic"\ntimeout = 5\n', "unknown field `timeout` - at `providers.p`"),
    ('[providers.p]\ntype = "anthropic"\n[roles.architect]\nprovider = "p"\nmodel = "m"\nmax_token = 5\n',
     "unknown field `max_token` - at `roles.architect`"),
    ('[providers.p]\ntype = "gemini"\n', "not one of the allowed values: 'gemini' - at `providers.p.type`"),
    ('[providers.p]\ntype = "vllm"\n', "providers.p: a vllm provider needs base_url"),
    ('[providers.p]\ntype = "anthropic"\n[default]\nprovider = "p"\nmodel = "m"\nparams = { stream = true }\n',
     "default.params: stream is set by the router"),
    ('[prices."qwen2.5"]\ninput = -1.0\noutput = 1.0\n', 'at `prices."qwen2.5".input`'),
    ('[defaults]\nprovider = "p"\n', "unknown field `defaults`"),
    ('[default\n', "not valid TOML"),
], ids=["route-provider", "fallback-provider", "provider-key", "route-key", "type", "base-url", "params",
        "price", "table", "toml"])
def test_a_mistake_in_the_routing_file_is_a_config_error_that_names_it(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "llm.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        LLMRouter.from_file(path)
    assert str(caught.value).startswith(f"LLM routing file {path}: ")
    assert problem in str(caught.value)


def test_the_example_routing_file_loads_and_its_commented_routes_are_valid() -> None:
    text = (REPO / "llm.toml").read_text()
    routing = llm_config.parse(text.encode(), REPO / "llm.toml")
    assert routing.default is not None and routing.default.provider in routing.providers
    head, examples = text.split("# A route for one skill", 1)
    uncommented = "\n".join(line[2:] for line in examples.splitlines()[1:]
                            if line.startswith("# ") and not line.startswith("# A route"))
    extended = llm_config.parse((head + uncommented).encode(), REPO / "llm.toml")
    assert set(extended.skills) == {"llm.chat", "proposals"} and set(extended.roles) == {"architect"}


# -- Keys, logs, spans -----------------------------------------------------------------------------


async def test_a_missing_api_key_falls_through_to_the_next_candidate_naming_the_variable(
    tmp_path: Path, fakes: Callable[..., FakeLLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    fake = fakes(answer("from the local server"))
    usages = Usages()
    with structlog.testing.capture_logs() as logs:
        async with router_for(tmp_path, anthropic("claude", fake), vllm("local", fake),
                              route("claude", "claude-x", ("local", "qwen"))) as router:
            result = await router.bind("plan", usage=usages).chat("hello")
    assert (result.text, result.provider) == ("from the local server", "local")
    assert [r.path for r in fake.requests] == ["/v1/chat/completions"]  # nothing sent without the key
    assert usages.outcomes == [("claude", "claude-x", "config"), ("local", "qwen", "ok")]
    [unusable] = [entry for entry in logs if entry["event"] == "llm_provider_unusable"]
    assert unusable == {"event": "llm_provider_unusable", "log_level": "warning", "provider": "claude",
                        "reason": "set ANTHROPIC_API_KEY in the environment to the Anthropic API key",
                        "next": "local/qwen"}


async def test_the_key_never_shows_in_logs_errors_or_spans(
    tmp_path: Path, fakes: Callable[..., FakeLLM], spans: tuple[Tracer, InMemorySpanExporter],
    caplog: pytest.LogCaptureFixture
) -> None:
    tracer, exporter = spans
    fake = fakes(answer("fine"), status(401, message="invalid x-api-key"), hang(0.4), status(500))
    caplog.set_level("DEBUG")
    errors: list[str] = []
    with structlog.testing.capture_logs() as logs:
        async with router_for(tmp_path, anthropic("claude", fake, timeout_s=0.2), route("claude", "claude-x"),
                              tracer=tracer) as router:
            llm = router.bind("plan")
            await llm.chat("hello")
            for _ in range(3):
                with pytest.raises(ProviderError) as caught:
                    await llm.chat("hello")
                errors.append(str(caught.value))
    assert [e.split(":")[0] for e in errors] == ["claude/claude-x", "llm.chat failed", "llm.chat failed"]
    assert logs and SECRET not in repr(logs)
    assert SECRET not in caplog.text
    assert not any(SECRET in e for e in errors)
    assert not any(SECRET in repr(dict(s.attributes or {})) for s in exporter.get_finished_spans())


async def test_logs_name_provider_model_outcome_latency_and_tokens_but_not_the_messages(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    fake = fakes(status(429, retry_after=2), answer("the secret plan"))
    with structlog.testing.capture_logs() as logs:
        async with router_for(tmp_path, vllm("local", fake), anthropic("claude", fake),
                              route("local", "qwen", ("claude", "claude-x"))) as router:
            await router.bind("plan", role="architect").chat("my private prompt")
    failed, ok = logs
    assert (failed["event"], failed["provider"], failed["model"], failed["outcome"], failed["status"],
            failed["retry_after_s"]) == ("llm_call_failed", "local", "qwen", "rate_limited", 429, 2.0)
    assert (ok["event"], ok["provider"], ok["outcome"], ok["tokens_in"], ok["tokens_out"]) == (
        "llm_call", "claude", "ok", 3, 3)
    assert ok["latency_s"] >= 0 and (ok["skill"], ok["role"]) == ("plan", "architect")
    assert "private" not in repr(logs) and "secret plan" not in repr(logs)


async def test_each_attempt_is_an_llm_chat_span_with_gen_ai_attributes(
    tmp_path: Path, fakes: Callable[..., FakeLLM], spans: tuple[Tracer, InMemorySpanExporter]
) -> None:
    tracer, exporter = spans
    first, second = fakes(status(500)), fakes(answer("two words"))
    async with router_for(tmp_path, anthropic("claude", first), vllm("local", second),
                          route("claude", "claude-x", ("local", "qwen")), tracer=tracer) as router:
        await router.bind("plan").chat("three words here")
    failed, ok = exporter.get_finished_spans()
    assert failed.name == ok.name == "llm.chat"
    assert (failed.status.status_code, failed.status.description) == (StatusCode.ERROR, "claude/claude-x: server (500)")
    assert ok.status.status_code != StatusCode.ERROR
    ours = ("gen_ai.", "ledgerbus.llm.", "error.")
    assert {k: v for k, v in (failed.attributes or {}).items() if k.startswith(ours)} == {
        "gen_ai.operation.name": "chat", "gen_ai.system": "anthropic", "gen_ai.request.model": "claude-x",
        "gen_ai.request.max_tokens": 1024, "ledgerbus.llm.provider": "claude", "error.type": "server",
        "gen_ai.usage.input_tokens": 0, "gen_ai.usage.output_tokens": 0}
    attributes: dict[str, Any] = dict(ok.attributes or {})
    assert (attributes["gen_ai.system"], attributes["gen_ai.request.model"], attributes["ledgerbus.llm.provider"],
            attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (
        "openai", "qwen", "local", 3, 2)  # the vllm alias speaks OpenAI's API


async def test_aclose_closes_the_providers_made_and_a_later_call_makes_them_anew(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    router = router_for(tmp_path, vllm("local", fakes()), route("local", "qwen"))
    await router.bind("plan").chat("hello")
    first = router.provider("local")
    await router.aclose()
    assert first._client.is_closed()  # type: ignore[attr-defined]
    assert router.provider("local") is not first
    await router.aclose()


# -- The fake as a process ---------------------------------------------------------------------


async def test_the_fake_runs_as_a_process_that_announces_its_url(tmp_path: Path) -> None:
    script, ready = tmp_path / "script.json", tmp_path / "fake.url"
    script.write_text(json.dumps([{"reply": "status", "code": 500}, {"reply": "answer", "text": "from a process"}]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakellm", "--script", str(script), "--port", "0", "--ready-file", str(ready),
        cwd=REPO, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        assert ready.read_text().strip() == url and url.startswith("http://127.0.0.1:")
        path = tmp_path / "llm.toml"
        path.write_text(f'[providers.local]\ntype = "vllm"\nbase_url = "{url}/v1"\n'
                        + route("local", "a", ("local", "b")))
        async with LLMRouter.from_file(path) as router:
            result = await router.bind("plan").chat("hello")
        assert (result.text, result.model) == ("from a process", "b")
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
