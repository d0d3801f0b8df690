"""Routing LLM calls: the routing file picks the provider and model, the router falls back.

An agent loads one :class:`LLMRouter` from its routing file and binds it to each task's
skill and role (:meth:`LLMRouter.bind`); the skill calls ``await ctx.llm.chat(...)``.
A call tries the route's candidates in order, the primary first:

- a retryable failure (``rate_limited``, ``timeout``, ``server``, ``malformed``) moves on
  to the next candidate at once: another provider or model is usually the faster way to
  an answer than waiting for this one;
- the last candidate, rate limited with a ``retry-after``, is the exception: nothing is
  left to move on to, so it waits that long (at most :attr:`LLMRouter.max_retry_wait_s`)
  and is tried once more;
- a provider that cannot be used as configured (``config``: no API key) moves on too, so
  that the fallback the routing file promises is one. It says so once per provider and
  router (one agent process), in one ``llm_provider_unusable`` warning with the reason
  and the next candidate; later calls pass it over without trying it (no span, no usage)
  until :meth:`LLMRouter.aclose` drops the providers made;
- any other failure (``refused``: the request itself is wrong; ``exhausted``: a scripted
  provider ran out of answers) fails the call at once, since another model would refuse
  it too, or would hide a script that ran short;
- when every candidate failed, the error has the kind of the last failure and lists
  every attempt with what the provider said: ``llm.chat failed: claude/claude-x:
  rate_limited (429, retry after 2s): <the API's message>; local/qwen: server (500): ...``.

Every attempt, good or failed, is reported to the bound usage sink (tokens, cost by the
price table, latency, outcome), logged (provider, model, outcome, status, latency,
tokens) and traced as one ``llm.chat`` span. Logs and spans carry no message contents
and no error details (a malformed answer's excerpt is the model's text); the error
raised to the skill does. Keys appear nowhere: providers hand them to the SDK only.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import msgspec
import nats.errors
import structlog
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from ledgerbus.agents.errors import BudgetError
from ledgerbus.agents.llm import calls, config
from ledgerbus.agents.llm.base import ChatRequest, ChatResult, Message, Provider, ProviderError, Usage, UsageSink
from ledgerbus.agents.llm.calls import CallRecord
from ledgerbus.agents.llm.replay import Match, Recording, ReplayProvider
from ledgerbus.agents.llm.config import Candidate, ProviderConfig, Route, RoutingFile
from ledgerbus.bus import metrics
from ledgerbus.bus.events import Budget

BudgetLeft = Callable[[], tuple[Budget | None, str]]
"""What is left of the budget over a task now, and whose budget it is (``None``: none)."""

log = structlog.get_logger(__name__)


class LLMRouter:
    """The providers and routes of one routing file, shared by every task of an agent.

    Providers (and their HTTP clients) are made on first use and kept until
    :meth:`aclose`, so a provider no route reaches never needs its key; one found unusable
    (a ``config`` failure) is passed over until then. ``tracer``
    defaults to the ``ledgerbus.llm`` tracer of the global provider; pass one to record
    spans elsewhere (tests do).
    """

    max_retry_wait_s: float = 5.0
    """The longest the last candidate is waited for after a rate limit."""

    def __init__(self, routing: RoutingFile | None, *, path: Path | None = None,
                 tracer: trace.Tracer | None = None) -> None:
        self.routing = routing
        """``None``: there is no routing file, and every call fails as ``config``."""
        self.path = path
        self.tracer = tracer or trace.get_tracer("ledgerbus.llm")
        self._providers: dict[str, Provider] = {}
        self._making: dict[str, asyncio.Future[Provider]] = {}
        self._unusable: dict[str, str] = {}
        """Providers that failed as ``config``, and why: passed over until :meth:`aclose`."""

    @classmethod
    def from_file(cls, path: Path | None, *, tracer: trace.Tracer | None = None) -> LLMRouter:
        """The router of the routing file at ``path``: checked now, so a mistake stops the
        agent at start (:class:`~bus.errors.ConfigError`). No file there (or no ``path``)
        makes a router without routes, whose calls fail until a file is written."""
        return cls(config.load(path) if path is not None else None, path=path, tracer=tracer)

    def route(self, skill: str, role: str = "") -> Route:
        """The route for ``skill`` called by an agent in ``role``: the role's route, else
        the skill's, else the default; a ``config`` :class:`ProviderError` if none."""
        who = f"skill {skill!r}" + (f" (role {role!r})" if role else "")
        if self.routing is None:
            where = f"no routing file at {self.path}" if self.path is not None else "no routing file"
            raise ProviderError("config", f"no LLM route for {who}: {where}; create llm.toml (or point"
                                " LEDGERBUS_LLM_CONFIG_PATH at one) with a [default] route")
        route = self.routing.route(skill, role)
        if route is None:
            raise ProviderError("config", f"no LLM route for {who} in {self.path or 'the routing file'}: add a"
                                f" [default] route, or [skills.{config.toml_key(skill)}]")
        return route

    def bind(self, skill: str, role: str = "", usage: UsageSink | None = None,
             budget: BudgetLeft | None = None, site: CallSite | None = None) -> LLM:
        """What a task's skill calls: routed for ``skill`` and ``role``, reporting every
        attempt to ``usage`` (awaited in line: what it raises, the call raises), held
        to ``budget`` (what is left of the budget over the task, and whose it is), and
        recording and replaying its calls as ``site`` says. Binding never fails; a missing
        route fails the call."""
        return LLM(self, skill, role, usage, budget, site)

    def provider(self, name: str) -> Provider:
        """The provider ``name`` of the routing file, made on first use (in this thread:
        inside a running agent, :meth:`ready` instead)."""
        provider = self._providers.get(name)
        if provider is None:
            provider = self._providers[name] = _make(name, self._provider_config(name))
        return provider

    async def ready(self, name: str) -> Provider:
        """The provider ``name``, made on first use in a worker thread: importing an SDK
        takes seconds, which in the event loop would stall a running agent past its WORK
        leases (and its tasks would be redelivered while they run). Callers at the same
        time share the one import."""
        provider = self._providers.get(name)
        if provider is not None:
            return provider
        making = self._making.get(name)
        if making is None:
            config = self._provider_config(name)
            making = self._making[name] = asyncio.ensure_future(asyncio.to_thread(_make, name, config))
        try:
            provider = await asyncio.shield(making)
        finally:
            if making.done():
                self._making.pop(name, None)
        self._providers.setdefault(name, provider)
        return self._providers[name]

    def _provider_config(self, name: str) -> ProviderConfig:
        # Routes are checked against the providers at load: a miss here is a caller's mistake.
        if self.routing is None or name not in self.routing.providers:
            raise ProviderError("config", f"no provider {name!r} in the routing file", provider=name)
        return self.routing.providers[name]

    def system(self, name: str) -> str:
        """The API the provider speaks, as OpenTelemetry names it (the span's
        ``gen_ai.system``): ``anthropic``, ``openai`` (for the ``vllm`` alias too),
        ``scripted``; a type without an OpenTelemetry name by its own (``replay``)."""
        kind: str = self._provider_config(name).type
        return config.GEN_AI_SYSTEMS.get(kind, kind)

    def unusable(self, name: str) -> str | None:
        """Why the provider ``name`` cannot answer (a ``config`` failure), if it was found so."""
        return self._unusable.get(name)

    def mark_unusable(self, name: str, reason: str, then: Candidate | None) -> None:
        """Remember that the provider ``name`` cannot answer, and say so the first time:
        one ``llm_provider_unusable`` warning with the reason and the candidate tried
        instead (``then``; ``None``: it was the last)."""
        if name in self._unusable:
            return
        self._unusable[name] = reason
        log.warning("llm_provider_unusable", provider=name, reason=reason,
                    next=f"{then.provider}/{then.model}" if then is not None else None)

    def cost(self, model: str, tokens_in: int, tokens_out: int) -> float:
        """A call's cost in USD by the price table (0.0 for a model without a price)."""
        return self.routing.cost(model, tokens_in, tokens_out) if self.routing is not None else 0.0

    async def aclose(self) -> None:
        """Close every provider made so far (their HTTP clients). Providers are made anew
        on the next call, so one found unusable is tried again (its key may be set now)."""
        providers, self._providers = list(self._providers.values()), {}
        self._unusable.clear()
        for provider in providers:
            await provider.aclose()

    async def warm(self) -> None:
        """Make every configured provider now (each in a worker thread, :meth:`ready`), so
        that the first call does not wait for its SDK's import."""
        for name in self.routing.providers if self.routing is not None else ():
            await self.ready(name)

    async def __aenter__(self) -> Self:
        """Nothing to open: providers are made on first use (:meth:`ready`) or by :meth:`warm`;
        the block's end closes them."""
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _make(name: str, settings: ProviderConfig) -> Provider:
    """A provider of the configured type. The SDKs are imported here, on first use:
    ``anthropic`` alone takes seconds to import, which an agent that never calls it (or
    an OpenAI-compatible-only one) should not pay at start."""
    if settings.type == "anthropic":
        from ledgerbus.agents.llm.anthropic import AnthropicProvider

        return AnthropicProvider(name, base_url=settings.base_url, api_key_env=settings.key_env(),
                                 timeout_s=settings.timeout_s)
    if settings.type == "replay":
        assert settings.file is not None  # config.parse refuses a replay provider without one
        return ReplayProvider(name, Recording.from_file(Path(settings.file)), settings.match or "lenient")
    if settings.type == "scripted":
        from ledgerbus.agents.llm.scripted import ScriptedProvider

        # config.parse has read a file's answers into `answers`.
        return ScriptedProvider(name, answers=settings.answers or [])
    from ledgerbus.agents.llm.openai_compat import OPENAI_BASE_URL, OpenAIProvider

    # "openai" and its alias "vllm" (which config.parse refuses without a base_url).
    return OpenAIProvider(name, base_url=settings.base_url or OPENAI_BASE_URL, api_key_env=settings.key_env(),
                          timeout_s=settings.timeout_s)


class CallSite:
    """Where one task attempt's calls are recorded and replayed from (see
    :mod:`agents.llm.calls` and :mod:`agents.llm.replay`): the task, its place in its tree,
    how to store a recorded call (``store``: its bytes in, its hash out), and the
    recording that answers its calls, if it replays one. It numbers the calls, from 1."""

    def __init__(self, *, task_id: str, attempt: int = 1, path: str = "", agent: str = "",
                 store: Callable[[bytes], Awaitable[str]] | None = None, max_bytes: int = 1024 * 1024,
                 replay: Callable[[], Awaitable[Recording]] | None = None, match: Match = "lenient",
                 live: bool = False) -> None:
        self.task_id, self.attempt, self.path, self.agent = task_id, attempt, path, agent
        self.store, self.max_bytes = store, max_bytes
        self._replay, self.match, self.live = replay, match, live
        self.calls = 0

    async def recording(self) -> Recording | None:
        """The recording this task's calls are answered from (loaded on first use), if any."""
        return await self._replay() if self._replay is not None else None

    def next(self) -> int:
        """The number of the call being made."""
        self.calls += 1
        return self.calls


class _Call(msgspec.Struct, frozen=True):
    """One ``chat`` call: its number in the task attempt and its request's hash."""

    n: int
    request_hash: str


class LLM:
    """The router bound to one task's skill and role: ``await llm.chat("...")``."""

    def __init__(self, router: LLMRouter, skill: str, role: str = "", usage: UsageSink | None = None,
                 budget: BudgetLeft | None = None, site: CallSite | None = None) -> None:
        self.router = router
        self.skill = skill
        self.role = role
        self._usage = usage
        self._budget = budget
        self.site = site

    def as_role(self, role: str) -> LLM:
        """The same binding, routed as ``role`` (a pipeline step names the role it plays,
        whichever agent runs it)."""
        return LLM(self.router, self.skill, role, self._usage, self._budget, self.site)

    def _check_budget(self, request: ChatRequest, model: str, max_tokens: int) -> None:
        """Refuse a call that could cross the budget over the task: its prompt (estimated
        at four characters a token) and its most output (``max_tokens``), priced by the
        price table for a cost budget. The router still counts what calls really use."""
        if self._budget is None:
            return
        left, owner = self._budget()
        if left is None:
            return
        chars = len(request.system or "") + sum(len(m.content) if isinstance(m.content, str) else
                                                 len(json.dumps(m.content)) for m in request.messages)
        prompt = -(-chars // 4)
        most = prompt + max_tokens
        if left.tokens is not None and most > left.tokens:
            raise BudgetError(f"not calling {model}: the call may use {most} tokens (about {prompt} in, at most "
                              f"{max_tokens} out) and the budget of task {owner} has {max(left.tokens, 0)} left")
        cost = self.router.cost(model, prompt, max_tokens)
        if left.cost_usd is not None and cost > left.cost_usd:
            raise BudgetError(f"not calling {model}: the call may cost ${cost:.4f} and the budget of task {owner} "
                              f"has ${max(left.cost_usd, 0):.4f} left")

    async def chat(self, request: ChatRequest | str, **overrides: Any) -> ChatResult:
        """Answer ``request`` (a plain string is one user message) with the first
        candidate of the route that succeeds; ``overrides`` replace fields of the request
        (``system=``, ``schema=``, ``max_tokens=``...). Raises :class:`ProviderError`:
        see the module docstring for which failures fall back and which fail at once."""
        if isinstance(request, str):
            request = ChatRequest(messages=[Message(role="user", content=request)])
        if overrides:
            request = msgspec.structs.replace(request, **overrides)
        call = _Call(self.site.next() if self.site else 0, calls.request_hash(request))
        site = self.site
        if site is not None and (recording := await site.recording()) is not None:
            found = recording.find(call.request_hash, site.path, call.n, site.match)
            if found is not None:
                return await self._replayed(found, "replay")
            if not site.live:
                raise recording.miss(call.request_hash, site.path, call.n, site.match)
        candidates = self.router.route(self.skill, self.role).candidates()
        failures: list[ProviderError] = []
        for at, candidate in enumerate(candidates):
            then = candidates[at + 1] if at + 1 < len(candidates) else None
            if (result := await self._try(candidate, request, failures, call, then)) is not None:
                return result
        last = failures[-1]
        if last.kind == "rate_limited" and last.retry_after_s is not None:
            # Nothing left to fall back to: the last candidate gets one more try, after the wait it asked for.
            await asyncio.sleep(min(last.retry_after_s, self.router.max_retry_wait_s))
            if (result := await self._try(candidates[-1], request, failures, call)) is not None:
                return result
            last = failures[-1]
        raise ProviderError(last.kind, "llm.chat failed: " + "; ".join(str(f) for f in failures),
                            provider=last.provider, model=last.model, retry_after_s=last.retry_after_s,
                            status=last.status)

    async def _try(self, candidate: Candidate, request: ChatRequest, failures: list[ProviderError],
                   call: _Call, then: Candidate | None = None) -> ChatResult | None:
        """One attempt; a retryable or ``config`` failure is added to ``failures``
        (``None``: move on to ``then``), any other is raised. A provider already found
        unusable is not tried: its reason is added to ``failures`` as it stands."""
        name = candidate.provider
        if (reason := self.router.unusable(name)) is not None:
            failures.append(ProviderError.of("config", reason, provider=name, model=candidate.model))
            return None
        try:
            return await self._attempt(candidate, request, call)
        except ProviderError as error:
            if error.kind == "config":
                self.router.mark_unusable(name, str(error).removeprefix(error.attempt + ": "), then)
            elif not error.retryable:
                raise
            failures.append(error)
            return None

    async def _attempt(self, candidate: Candidate, request: ChatRequest, call: _Call) -> ChatResult:
        """One call to one candidate: traced, logged and reported whatever its outcome;
        recorded when it is answered."""
        name, model = candidate.provider, candidate.model
        if self.router.system(name) == "replay":
            return await self._from_replay_provider(name, request, call)
        max_tokens = request.max_tokens or candidate.max_tokens or config.DEFAULT_MAX_TOKENS
        self._check_budget(request, model, max_tokens)
        if request.temperature is None and candidate.temperature is not None:
            request = msgspec.structs.replace(request, temperature=candidate.temperature)
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "chat", "gen_ai.system": self.router.system(name), "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": max_tokens, "ledgerbus.llm.provider": name, "ledgerbus.skill": self.skill,
        }
        # The span's status is set below: recording the exception itself would put its
        # message (a malformed answer's excerpt: the model's text) in the trace.
        with self.router.tracer.start_as_current_span("llm.chat", kind=SpanKind.CLIENT, attributes=attributes,
                                                      record_exception=False, set_status_on_exception=False) as span:
            started = time.monotonic()
            try:
                provider = await self.router.ready(name)
                result = await provider.chat(request, model=model, max_tokens=max_tokens, params=candidate.params)
            except ProviderError as error:
                latency_s = time.monotonic() - started
                span.set_attributes({"error.type": error.kind, "gen_ai.usage.input_tokens": 0,
                                     "gen_ai.usage.output_tokens": 0})
                span.set_status(Status(StatusCode.ERROR, error.attempt))
                metrics.llm_duration.record(latency_s, {**_metric_attrs(attributes), "error.type": error.kind})
                log.warning("llm_call_failed", skill=self.skill, role=self.role, provider=name, model=model,
                            outcome=error.kind, status=error.status, retry_after_s=error.retry_after_s,
                            latency_s=round(latency_s, 3))
                await self._report(Usage(provider=name, model=model, latency_s=latency_s, outcome=error.kind))
                raise
            latency_s = time.monotonic() - started
            cost = self.router.cost(model, result.tokens_in, result.tokens_out)
            result = msgspec.structs.replace(result, cost_usd=cost, latency_s=latency_s)
            span.set_attributes({"gen_ai.usage.input_tokens": result.tokens_in,
                                 "gen_ai.usage.output_tokens": result.tokens_out, "ledgerbus.llm.cost_usd": cost})
            if result.stop_reason:
                span.set_attribute("gen_ai.response.finish_reasons", [result.stop_reason])
            common = _metric_attrs(attributes)
            metrics.llm_duration.record(latency_s, common)
            metrics.llm_token_usage.record(result.tokens_in, {**common, "gen_ai.token.type": "input"})
            metrics.llm_token_usage.record(result.tokens_out, {**common, "gen_ai.token.type": "output"})
            recorded = await self._record(request, call, result, max_tokens, candidate.params)
            log.info("llm_call", skill=self.skill, role=self.role, provider=name, model=model, outcome="ok",
                     latency_s=round(latency_s, 3), tokens_in=result.tokens_in, tokens_out=result.tokens_out,
                     cost_usd=cost, call=recorded[:12])
            await self._report(Usage(provider=name, model=model, tokens_in=result.tokens_in,
                                     tokens_out=result.tokens_out, cost_usd=cost, latency_s=latency_s, call=recorded))
            return result

    async def _record(self, request: ChatRequest, call: _Call, result: ChatResult, max_tokens: int,
                      params: dict[str, Any]) -> str:
        """Store the answered call (:mod:`agents.llm.calls`); its hash ("" when this binding
        does not record, or the store failed). Stored before its usage is reported, so the
        record that names it never names a call that is not there. A store that fails loses
        the recording, not the answer the call paid for: it is logged
        (``llm_call_not_recorded``) and the usage is reported without a hash."""
        site = self.site
        if site is None or site.store is None:
            return ""
        _, body = calls.make(task_id=site.task_id, attempt=site.attempt, path=site.path, n=call.n, skill=self.skill,
                             role=self.role, agent=site.agent, request=request, request_sha256=call.request_hash,
                             result=result, max_tokens=max_tokens, params=params, max_bytes=site.max_bytes)
        try:
            return await site.store(body)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("llm_call_not_recorded", skill=self.skill, task_id=site.task_id, n=call.n,
                        error=str(exc) or type(exc).__name__)
            return ""

    async def _from_replay_provider(self, name: str, request: ChatRequest, call: _Call) -> ChatResult:
        """A route's ``replay`` provider: the answer from its recording, or :class:`ReplayMiss`."""
        provider = await self.router.ready(name)
        assert isinstance(provider, ReplayProvider)
        path = self.site.path if self.site is not None else ""
        found = provider.recording.find(call.request_hash, path, call.n, provider.match)
        if found is None:
            raise provider.recording.miss(call.request_hash, path, call.n, provider.match)
        return await self._replayed(found, name, provider.recording.raw.get(found[0]))

    async def _replayed(self, found: tuple[str, CallRecord], provider: str, raw: bytes | None = None) -> ChatResult:
        """A recorded answer, reported as a ``replayed`` call naming the recording it came from
        (no tokens spent; stored here first if it came from a file, so ``agentctl llm show``
        finds it)."""
        name, record = found
        with self.router.tracer.start_as_current_span("llm.chat", kind=SpanKind.CLIENT, attributes={
                "gen_ai.operation.name": "chat", "gen_ai.system": "replay", "gen_ai.request.model": record.model,
                "ledgerbus.llm.provider": provider, "ledgerbus.skill": self.skill, "ledgerbus.llm.call": name}):
            if raw is not None and self.site is not None and self.site.store is not None:
                await self.site.store(raw)
            log.info("llm_call", skill=self.skill, role=self.role, provider=provider, model=record.model,
                     outcome="replayed", call=name[:12], recorded_path=record.path, recorded_n=record.n)
            await self._report(Usage(provider=provider, model=record.model, outcome="replayed", call=name))
            return msgspec.structs.replace(record.result(), provider=provider)

    async def _report(self, usage: Usage) -> None:
        if self._usage is not None:
            await self._usage(usage)


def _metric_attrs(span_attributes: dict[str, AttributeValue]) -> dict[str, AttributeValue]:
    """The low-cardinality attributes of an LLM call's metrics, from its span's."""
    keys = ("gen_ai.operation.name", "gen_ai.system", "gen_ai.request.model", "ledgerbus.skill")
    return {k: span_attributes[k] for k in keys if k in span_attributes}
