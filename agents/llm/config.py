"""The LLM routing file (``llm.toml``; ``Settings.llm_config_path``): which provider and
model serve each skill and role, in what fallback order, and what the models cost.

The file is decoded strictly: an unknown key, a route naming a provider that is not
declared, a ``vllm`` provider without a ``base_url`` or a scripted provider without its
answers is a :class:`~bus.errors.ConfigError` that names the file and the key, at load
time rather than at the first call (a scripted provider's answers ``file`` is read then
too). The format is documented, with an example of every table, in the ``llm.toml`` at
the repository root.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from ledgerbus.agents.llm.base import ProviderError
from ledgerbus.agents.llm.replay import Recording
from ledgerbus.agents.llm.scripted import AnswerLine, read_answers
from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.problems import explain

DEFAULT_MAX_TOKENS = 1024
"""A route's ``max_tokens`` when it does not say."""

ProviderType = Literal["anthropic", "openai", "vllm", "scripted", "replay"]
"""``vllm`` is the older name of ``openai`` (any OpenAI-compatible server), kept as an
alias that still needs a ``base_url`` and reads ``VLLM_API_KEY``. ``replay`` answers from
a recording file (docs/replay.md)."""

API_KEY_ENVS: dict[str, str] = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY",
                                "vllm": "VLLM_API_KEY"}
"""The environment variable each provider type reads its key from, unless ``api_key_env``
says (a scripted provider has no key)."""

GEN_AI_SYSTEMS: dict[str, str] = {"anthropic": "anthropic", "openai": "openai", "vllm": "openai",
                                  "scripted": "scripted", "replay": "replay"}
"""Each type's ``gen_ai.system`` (the OpenTelemetry name of the API it speaks)."""

RESERVED_PARAMS = frozenset({"model", "messages", "system", "max_tokens", "temperature", "stream", "tools",
                             "tool_choice", "response_format"})
"""Request fields the router and providers set themselves: a route's ``params`` may not
override them (``max_tokens`` and ``temperature`` have fields of their own)."""

_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class ProviderConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[providers.NAME]``: one backend, reached with one HTTP client (a scripted
    provider: a queue of canned answers)."""

    type: ProviderType
    base_url: _NonEmpty | None = None
    """Anthropic: the API's address (default: the SDK's, or ``ANTHROPIC_BASE_URL``).
    OpenAI: the server's OpenAI-compatible root, e.g. ``http://127.0.0.1:11434/v1``
    (default: the public API, :data:`~agents.llm.openai_compat.OPENAI_BASE_URL`).
    vLLM: the same, but required."""
    api_key_env: _NonEmpty | None = None
    """The environment variable holding the key (default: :data:`API_KEY_ENVS` of the type).
    The file names the variable, never the key."""
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    """How long one call may take before it fails as ``timeout`` and the router moves on."""
    answers: list[AnswerLine] | None = None
    """Scripted only: the answers, in order (a string, or a table with ``text`` and
    optionally ``data``, ``tokens_in``, ``tokens_out``, ``stop_reason``). Once loaded,
    a ``file``'s answers are here too."""
    file: _NonEmpty | None = None
    """Scripted: a file of answers, one JSON value a line. Replay: the recording (``agentctl
    llm export``), one recorded call a line. Relative to the routing file's directory (once
    loaded: the resolved path)."""
    match: Literal["strict", "lenient"] | None = None
    """Replay only: ``strict`` answers a call only from a recorded call with the same request
    hash; ``lenient`` (the default) else from the call at the same place of its task tree."""

    def key_env(self) -> str:
        """The environment variable this provider reads its key from (``""``: none, for
        a scripted provider)."""
        return self.api_key_env or API_KEY_ENVS.get(self.type, "")


class Price(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[prices."MODEL"]``: USD per million tokens."""

    input: Annotated[float, msgspec.Meta(ge=0)]
    output: Annotated[float, msgspec.Meta(ge=0)]


class Candidate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One provider and model to try, with the request parameters that go with them."""

    provider: _NonEmpty
    """A name declared under ``[providers]``."""
    model: _NonEmpty
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0)] | None = None
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    """More fields of the provider's request body, sent as they are (``top_p``, vLLM's
    ``top_k``...): unknown ones are the provider's to refuse."""


class Route(Candidate, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[default]``, ``[skills."SKILL"]`` or ``[roles."ROLE"]``: a primary candidate and
    the fallbacks tried in order when it is rate limited, times out, fails or answers
    garbage. A fallback without ``max_tokens`` or ``temperature`` takes the route's; its
    ``params`` are its own (they are usually provider-specific)."""

    fallbacks: list[Candidate] = msgspec.field(default_factory=list)

    def candidates(self) -> list[Candidate]:
        """The primary, then each fallback, with the route's defaults filled in."""
        max_tokens = self.max_tokens or DEFAULT_MAX_TOKENS
        primary = Candidate(provider=self.provider, model=self.model, max_tokens=max_tokens,
                            temperature=self.temperature, params=self.params)
        return [primary] + [
            msgspec.structs.replace(
                fallback,
                max_tokens=fallback.max_tokens or max_tokens,
                temperature=self.temperature if fallback.temperature is None else fallback.temperature,
            )
            for fallback in self.fallbacks
        ]


class RoutingFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything ``llm.toml`` may say."""

    providers: dict[str, ProviderConfig] = msgspec.field(default_factory=dict)
    prices: dict[str, Price] = msgspec.field(default_factory=dict)
    default: Route | None = None
    skills: dict[str, Route] = msgspec.field(default_factory=dict)
    roles: dict[str, Route] = msgspec.field(default_factory=dict)

    def route(self, skill: str, role: str = "") -> Route | None:
        """The route for a call: the role's if the caller has a role that has one, else
        the skill's, else the default (``None``: no route at all)."""
        if role and role in self.roles:
            return self.roles[role]
        return self.skills.get(skill, self.default)

    def cost(self, model: str, tokens_in: int, tokens_out: int) -> float:
        """What a call cost in USD by the price table; 0.0 for a model without a price."""
        price = self.prices.get(model)
        if price is None:
            return 0.0
        return (tokens_in * price.input + tokens_out * price.output) / 1_000_000


_TABLES: dict[str, type[msgspec.Struct]] = {"providers": ProviderConfig, "prices": Price, "skills": Route,
                                            "roles": Route}
_IN_TABLE = re.compile(r"^\$\.(\w+)\[\.\.\.\]")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def load(path: Path) -> RoutingFile | None:
    """Read and check the routing file; ``None`` when there is no file at ``path``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"LLM routing file {path}: {exc.strerror or exc}") from exc
    return parse(data, path)


def parse(data: bytes, path: Path) -> RoutingFile:
    """Decode and check the text of a routing file; errors name ``path`` and the key."""
    try:
        config = msgspec.toml.decode(data, type=RoutingFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"LLM routing file {path}: {_locate(data, exc)}") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(f"LLM routing file {path}: {explain(exc, 'TOML')}") from exc
    problems = _problems(config)
    if problems:
        raise ConfigError(f"LLM routing file {path}: " + "; ".join(problems))
    return _with_answer_files(config, path)


def _with_answer_files(config: RoutingFile, path: Path) -> RoutingFile:
    """``config`` with each scripted provider's answers ``file`` read (relative to the
    routing file's directory) into its ``answers``: a missing or broken file stops the
    agent at start, as a mistake in the routing file itself does."""
    providers = dict(config.providers)
    for name, provider in config.providers.items():
        if provider.type == "replay" and provider.file is not None:
            recording = path.parent / provider.file
            try:
                Recording.from_file(recording)  # read now, so a missing or broken file stops the agent at start
            except ProviderError as exc:
                raise ConfigError(f"LLM routing file {path}: providers.{toml_key(name)}.file: {exc}") from exc
            providers[name] = msgspec.structs.replace(provider, file=str(recording))
            continue
        if provider.type != "scripted" or provider.file is None:
            continue
        file = path.parent / provider.file
        try:
            answers = read_answers(file)
        except ConfigError as exc:
            raise ConfigError(f"LLM routing file {path}: providers.{toml_key(name)}.file: {exc}") from exc
        providers[name] = msgspec.structs.replace(provider, file=str(file), answers=answers)
    return msgspec.structs.replace(config, providers=providers)


def _problems(config: RoutingFile) -> list[str]:
    """What the types cannot say: providers that routes name but the file does not
    declare, keys a provider's type does not take (a vllm provider without an address, a
    scripted one without exactly one of answers and file), params that would override
    the router."""
    problems = [problem for name, provider in config.providers.items()
                for problem in _provider_problems(f"providers.{toml_key(name)}", provider)]
    routes = [("default", config.default)] if config.default else []
    routes += [(f"skills.{toml_key(name)}", route) for name, route in config.skills.items()]
    routes += [(f"roles.{toml_key(name)}", route) for name, route in config.roles.items()]
    known = ", ".join(sorted(config.providers)) or "none declared"
    for where, route in routes:
        entries: list[tuple[str, Candidate]] = [(where, route)]
        entries += [(f"{where}.fallbacks[{i}]", fallback) for i, fallback in enumerate(route.fallbacks)]
        for at, candidate in entries:
            if candidate.provider not in config.providers:
                problems.append(f"{at}: unknown provider {candidate.provider!r} (known: {known})")
            problems += [f"{at}.params: {name} is set by the router, not by params (max_tokens and temperature"
                         " are fields of the route)" for name in sorted(RESERVED_PARAMS & candidate.params.keys())]
    return problems


def _provider_problems(at: str, provider: ProviderConfig) -> list[str]:
    if provider.match is not None and provider.type != "replay":
        return [f"{at}.match: only a replay provider takes match"]
    if provider.type == "replay":
        problems = [f"{at}.{key}: a replay provider calls no server, so it takes no {key}"
                    for key, value in (("base_url", provider.base_url), ("api_key_env", provider.api_key_env),
                                       ("answers", provider.answers)) if value is not None]
        if provider.file is None:
            problems.append(f"{at}: a replay provider needs file (a recording: agentctl llm export TASK -o FILE)")
        return problems
    if provider.type != "scripted":
        problems = [f"{at}.{key}: only a scripted provider takes {key}"
                    for key, value in (("answers", provider.answers), ("file", provider.file)) if value is not None]
        if provider.type == "vllm" and not provider.base_url:
            problems.append(f"{at}: a vllm provider needs base_url (its OpenAI-compatible /v1 address)")
        return problems
    problems = [f"{at}.{key}: a scripted provider calls no server, so it takes no {key}"
                for key, value in (("base_url", provider.base_url), ("api_key_env", provider.api_key_env))
                if value is not None]
    if provider.answers is None and provider.file is None:
        problems.append(f"{at}: a scripted provider needs answers (a list) or file (one JSON answer a line)")
    elif provider.answers is not None and provider.file is not None:
        problems.append(f"{at}: a scripted provider takes answers or file, not both")
    return problems


def _locate(data: bytes, exc: msgspec.ValidationError) -> str:
    """The error with a TOML path: msgspec says ``$.providers[...]`` for any entry of a
    table, so find the entry that fails and name it (``providers.claude.typo``)."""
    problem = explain(exc)
    match = _IN_TABLE.match(problem.path)
    if match is None:
        return problem.at("")
    table = match.group(1)
    raw = msgspec.toml.decode(data)
    for name, body in (raw.get(table) or {}).items():
        try:
            msgspec.convert(body, _TABLES[table])
        except msgspec.ValidationError as inner:
            return explain(inner).at(f"{table}.{toml_key(name)}")
    return problem.at("")


def toml_key(name: str) -> str:
    """``name`` as a TOML key, for messages that name a table: quoted unless bare (skill
    names have dots: ``skills."llm.chat"``)."""
    return name if _BARE_KEY.match(name) else '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
