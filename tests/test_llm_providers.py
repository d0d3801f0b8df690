"""Providers as users name them: ``openai`` for any OpenAI-compatible server (``vllm`` kept
as its alias), a provider without its key passed over for the next candidate with one
warning, and the ``scripted`` provider's canned answers. The OpenAI-compatible server is
tests/fakellm.py, a real HTTP server that the real SDK talks to; nothing reaches the
public APIs (a provider without its key never sends)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ledgerbus.agents.llm import ChatRequest, LLMRouter, Message, ProviderError
from ledgerbus.agents.llm.openai_compat import OPENAI_BASE_URL, OpenAIProvider
from ledgerbus.agents.llm.scripted import ScriptedAnswer, ScriptedProvider
from ledgerbus.bus.errors import ConfigError
from tests.fakellm import FakeLLM, answer
from tests.test_llm import REPO, SCHEMA, Usages, anthropic, route, router_for, vllm

PLAN = {"title": "Ship it", "steps": ["build", "test"]}


@pytest.fixture(autouse=True)
def no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """No provider key at all, whatever the developer's shell has: the newcomer's setup."""
    for env in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(env, raising=False)


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakeLLM]]:
    """``fakes(*replies)``: a running fake API with that script, stopped after the test."""
    with contextlib.ExitStack() as running:
        yield lambda *script: running.enter_context(FakeLLM(*script))


def openai(name: str, fake: FakeLLM | None = None, extra: str = "") -> str:
    """An ``openai`` provider: at the fake's address, or (no fake) the public API's default."""
    where = f'base_url = "{fake.openai_url}"\n' if fake is not None else ""
    return f'[providers.{name}]\ntype = "openai"\n{where}timeout_s = 2\n{extra}'


def scripted(name: str, body: str) -> str:
    return f'[providers.{name}]\ntype = "scripted"\n{body}\n'


def unusable_lines(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == "llm_provider_unusable"]


# -- type = "openai", and its alias "vllm" ---------------------------------------------------------


async def test_openai_type_talks_to_any_compatible_server_and_sends_empty_without_a_key(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    exporter = InMemorySpanExporter()
    traces = TracerProvider()
    traces.add_span_processor(SimpleSpanProcessor(exporter))
    fake = fakes(answer("hello from ollama"))
    async with router_for(tmp_path, openai("ollama", fake), route("ollama", "llama3.2"),
                          tracer=traces.get_tracer("test")) as router:
        result = await router.bind("plan").chat("hi")
    assert (result.text, result.provider, result.model) == ("hello from ollama", "ollama", "llama3.2")
    assert fake.requests[0].path == "/v1/chat/completions"
    assert fake.requests[0].headers["authorization"] == "Bearer EMPTY"
    [span] = exporter.get_finished_spans()
    assert (span.attributes or {})["gen_ai.system"] == "openai"


async def test_openai_type_reads_OPENAI_API_KEY_and_the_vllm_alias_reads_VLLM_API_KEY(
    tmp_path: Path, fakes: Callable[..., FakeLLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")
    monkeypatch.setenv("VLLM_API_KEY", "vllm-key")
    fake = fakes()
    async with router_for(tmp_path, openai("remote", fake), vllm("local", fake), route("remote", "gpt"),
                          route("local", "qwen", table="skills.review")) as router:
        await router.bind("plan").chat("hi")
        await router.bind("review").chat("hi")
        assert router.system("remote") == router.system("local") == "openai"
    assert [r.headers["authorization"] for r in fake.requests] == ["Bearer openai-key", "Bearer vllm-key"]


async def test_openai_without_base_url_is_the_public_api_which_needs_a_key_at_call_time() -> None:
    provider = OpenAIProvider("gpt")  # made without a key: an agent that never calls it must start
    assert provider.base_url == OPENAI_BASE_URL == "https://api.openai.com/v1"
    with pytest.raises(ProviderError) as caught:
        await provider.chat(ChatRequest(messages=[Message(role="user", content="hi")]), model="gpt-4o",
                            max_tokens=10, params={})
    await provider.aclose()
    assert caught.value.kind == "config"
    assert str(caught.value) == ("gpt/gpt-4o: config: set OPENAI_API_KEY in the environment to the OpenAI API key"
                                 " (api.openai.com needs one; a local OpenAI-compatible server does not)")


def test_the_vllm_alias_still_needs_a_base_url_and_openai_does_not(tmp_path: Path) -> None:
    path = tmp_path / "llm.toml"
    path.write_text('[providers.gpt]\ntype = "openai"\n[providers.local]\ntype = "vllm"\n')
    with pytest.raises(ConfigError, match="providers.local: a vllm provider needs base_url") as caught:
        LLMRouter.from_file(path)
    assert "providers.gpt" not in str(caught.value)


# -- A provider without its key falls through ----------------------------------------------------------


async def test_public_openai_without_a_key_falls_through_with_one_warning_for_every_call(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    fake = fakes(answer("one"), answer("two"))
    usages = Usages()
    with structlog.testing.capture_logs() as logs:
        async with router_for(tmp_path, openai("gpt"), openai("local", fake),
                              route("gpt", "gpt-4o", ("local", "qwen"))) as router:
            llm = router.bind("plan", usage=usages)
            answers = [(await llm.chat("hi")).text, (await llm.chat("again")).text]
            other = await router.bind("review").chat("from another task")
    assert answers == ["one", "two"] and other.provider == "local"
    assert unusable_lines(logs) == [{
        "event": "llm_provider_unusable", "log_level": "warning", "provider": "gpt", "next": "local/qwen",
        "reason": "set OPENAI_API_KEY in the environment to the OpenAI API key (api.openai.com needs one;"
                  " a local OpenAI-compatible server does not)"}]
    # Tried once, found unusable, then passed over: no more failed attempts to report.
    assert usages.outcomes == [("gpt", "gpt-4o", "config"), ("local", "qwen", "ok"), ("local", "qwen", "ok")]


async def test_anthropic_without_a_key_falls_through_to_an_openai_compatible_server(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    fake = fakes(answer(data=PLAN))
    with structlog.testing.capture_logs() as logs:
        async with router_for(tmp_path, anthropic("claude", fake), openai("local", fake),
                              route("claude", "claude-x", ("local", "qwen"))) as router:
            result = await router.bind("plan").chat("plan the release", schema=SCHEMA, schema_name="plan")
    assert (result.provider, result.data) == ("local", PLAN)
    assert [r.path for r in fake.requests] == ["/v1/chat/completions"]
    [line] = unusable_lines(logs)
    assert (line["provider"], line["next"]) == ("claude", "local/qwen")
    assert "ANTHROPIC_API_KEY" in str(line["reason"])


async def test_when_every_candidate_is_unusable_the_error_lists_each_and_says_the_same_next_time(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    fake = fakes()
    errors: list[ProviderError] = []
    with structlog.testing.capture_logs() as logs:
        async with router_for(tmp_path, anthropic("claude", fake), openai("gpt"),
                              route("claude", "claude-x", ("gpt", "gpt-4o"))) as router:
            for _ in range(2):
                with pytest.raises(ProviderError) as caught:
                    await router.bind("plan").chat("hi")
                errors.append(caught.value)
    first, second = errors
    assert str(first) == str(second) == (
        "llm.chat failed: claude/claude-x: config: set ANTHROPIC_API_KEY in the environment to the Anthropic API"
        " key; gpt/gpt-4o: config: set OPENAI_API_KEY in the environment to the OpenAI API key (api.openai.com"
        " needs one; a local OpenAI-compatible server does not)")
    assert (second.kind, second.provider, second.model) == ("config", "gpt", "gpt-4o")
    assert [(line["provider"], line["next"]) for line in unusable_lines(logs)] == [
        ("claude", "gpt/gpt-4o"), ("gpt", None)]
    assert fake.requests == []


async def test_an_unusable_provider_is_tried_again_once_the_router_made_its_providers_anew(
    tmp_path: Path, fakes: Callable[..., FakeLLM], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fakes(answer("fallback"), answer("primary"))
    router = router_for(tmp_path, anthropic("claude", fake), openai("local", fake),
                        route("claude", "claude-x", ("local", "qwen")))
    assert (await router.bind("plan").chat("hi")).provider == "local"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-set-later")
    assert (await router.bind("plan").chat("hi")).provider == "local"  # this instance read no key
    await router.aclose()
    assert (await router.bind("plan").chat("hi")).provider == "claude"
    await router.aclose()


# -- type = "scripted" -------------------------------------------------------------------------------------


async def test_scripted_answers_from_the_routing_file_in_order_as_routed_then_says_it_ran_out(
    tmp_path: Path, fakes: Callable[..., FakeLLM]
) -> None:
    fallback = fakes()
    usages = Usages()
    answers = ('answers = ["first", { text = "second", tokens_in = 3, tokens_out = 4, stop_reason = "end_turn" },'
               ' { data = { title = "Ship it", steps = ["build", "test"] } }]')
    with structlog.testing.capture_logs() as logs:
        async with router_for(tmp_path, scripted("demo", answers), openai("local", fallback),
                              route("demo", "recorded-model", ("local", "qwen"))) as router:
            llm = router.bind("plan", usage=usages)
            first, second = await llm.chat("anything"), await llm.chat("anything else")
            third = await llm.chat("plan it", schema=SCHEMA)
            with pytest.raises(ProviderError) as caught:
                await llm.chat("one more")
    assert (first.text, first.provider, first.model, first.tokens_in) == ("first", "demo", "recorded-model", 0)
    assert (second.text, second.tokens_in, second.tokens_out, second.stop_reason) == ("second", 3, 4, "end_turn")
    assert third.data == PLAN and json.loads(third.text) == PLAN
    assert (caught.value.kind, str(caught.value)) == (
        "exhausted", "demo/recorded-model: exhausted: scripted provider 'demo' has no answer left (it had 3)")
    assert fallback.requests == []  # a script that ran short is not hidden behind a fallback
    assert usages.outcomes[-1] == ("demo", "recorded-model", "exhausted")
    assert [(e["provider"], e["answers"], e["log_level"]) for e in logs if e["event"] == "llm_provider_scripted"] == [
        ("demo", 3, "warning")]


async def test_scripted_answers_from_a_file_beside_the_routing_file(tmp_path: Path) -> None:
    (tmp_path / "recordings").mkdir()
    lines = ['"plain text"', "", json.dumps({"text": json.dumps(PLAN)}), json.dumps({"data": PLAN, "text": "as data"}),
             json.dumps({"text": "not json"})]
    (tmp_path / "recordings" / "answers.jsonl").write_text("\n".join(lines) + "\n")
    async with router_for(tmp_path, scripted("demo", 'file = "recordings/answers.jsonl"'),
                          route("demo", "m")) as router:
        llm = router.bind("plan")
        plain = await llm.chat("hi")
        decoded = await llm.chat("plan", schema=SCHEMA)
        given = await llm.chat("plan", schema=SCHEMA)
        with pytest.raises(ProviderError) as caught:
            await llm.chat("plan", schema=SCHEMA)
    assert (plain.text, plain.data) == ("plain text", None)
    assert decoded.data == PLAN  # no data: the text, decoded as JSON
    assert (given.text, given.data) == ("as data", PLAN)
    assert caught.value.kind == "malformed" and "the scripted answer is not JSON: not json" in str(caught.value)


async def test_concurrent_calls_each_take_their_own_scripted_answer() -> None:
    provider = ScriptedProvider("demo", answers=[str(n) for n in range(5)])
    request = ChatRequest(messages=[Message(role="user", content="hi")])
    results = await asyncio.gather(*(provider.chat(request, model="m", max_tokens=5, params={}) for _ in range(5)))
    assert sorted(r.text for r in results) == ["0", "1", "2", "3", "4"] and provider.left == 0


async def test_scripted_provider_made_in_python_takes_strings_answers_and_mappings() -> None:
    provider = ScriptedProvider("test", answers=["a", ScriptedAnswer(text="b", tokens_out=1), {"data": [1, 2]}])
    request = ChatRequest(messages=[Message(role="user", content="hi")])
    got = [await provider.chat(request, model="m", max_tokens=5, params={}) for _ in range(3)]
    assert [(r.text, r.data, r.tokens_out) for r in got] == [("a", None, 0), ("b", None, 1), ("[1,2]", [1, 2], 0)]
    with pytest.raises(ProviderError, match=r"scripted provider 'test' has no answer left \(it had 3\)"):
        await provider.chat(request, model="m", max_tokens=5, params={})


@pytest.mark.parametrize("body, problem", [
    ("", "providers.demo: a scripted provider needs answers (a list) or file (one JSON answer a line)"),
    ('answers = ["a"]\nfile = "a.jsonl"', "providers.demo: a scripted provider takes answers or file, not both"),
    ('answer = ["a"]', "unknown field `answer` - at `providers.demo`"),
    ('answers = [{ txt = "a" }]', "unknown field `txt` - at `providers.demo.answers[0]`"),
    ('answers = ["a"]\nbase_url = "http://x/v1"', "providers.demo.base_url: a scripted provider calls no server"),
    ('file = "missing.jsonl"', "providers.demo.file: "),
], ids=["neither", "both", "unknown-key", "answer-key", "base-url", "missing-file"])
def test_a_mistake_in_a_scripted_provider_is_a_config_error_that_names_it(
    tmp_path: Path, body: str, problem: str
) -> None:
    path = tmp_path / "llm.toml"
    path.write_text(scripted("demo", body))
    with pytest.raises(ConfigError) as caught:
        LLMRouter.from_file(path)
    assert str(caught.value).startswith(f"LLM routing file {path}: ")
    assert problem in str(caught.value)


def test_answers_belong_to_scripted_providers_only(tmp_path: Path) -> None:
    path = tmp_path / "llm.toml"
    path.write_text('[providers.claude]\ntype = "anthropic"\nanswers = ["a"]\n')
    with pytest.raises(ConfigError, match="providers.claude.answers: only a scripted provider takes answers"):
        LLMRouter.from_file(path)


def test_a_bad_line_of_an_answers_file_is_named_by_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "answers.jsonl").write_text('"fine"\n{"text": "ok"}\n{"text": 5}\n')
    path = tmp_path / "llm.toml"
    path.write_text(scripted("demo", 'file = "answers.jsonl"'))
    with pytest.raises(ConfigError) as caught:
        LLMRouter.from_file(path)
    assert str(caught.value) == (f"LLM routing file {path}: providers.demo.file: {tmp_path / 'answers.jsonl'}"
                                 " line 3: expected str, got int - at `text`")


async def test_the_scripted_example_in_llm_toml_loads_and_answers(tmp_path: Path) -> None:
    text = (REPO / "llm.toml").read_text()
    block = text[text.index("# [providers.demo]"):].split("\n\n", 1)[0]
    example = "\n".join(line.removeprefix("# ") for line in block.splitlines())
    async with router_for(tmp_path, example, route("demo", "canned")) as router:
        hello = await router.bind("plan").chat("hi")
        plan = await router.bind("plan").chat("plan it", schema=SCHEMA)
    assert (hello.text, plan.data) == ("Hello from a script.", PLAN)


def test_doctor_names_what_each_provider_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ledgerbus.agentctl.common import App
    from ledgerbus.agentctl.doctor import _llm
    from ledgerbus.bus.settings import Settings

    routing = tmp_path / "llm.toml"
    routing.write_text('[providers.public]\ntype = "openai"\n\n[providers.local]\ntype = "openai"\n'
                       'base_url = "http://127.0.0.1:8000/v1"\n\n[providers.canned]\ntype = "scripted"\n'
                       'answers = ["a", "b"]\n')
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    found = {f.check: f for f in _llm(App(Settings(llm_config_path=routing), "console", "info"))}
    assert found["llm provider public"].level == "warn" and "OPENAI_API_KEY is not set" in found["llm provider public"].detail
    assert found["llm provider local"].level == "ok"
    assert found["llm provider canned"].detail.startswith("scripted: 2 canned answers, not a model")
