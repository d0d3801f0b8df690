"""The Anthropic Messages API, through the official SDK (``AsyncAnthropic``).

The SDK's own retries are off (``max_retries=0``): whether to wait, retry or fall back to
another model is the router's decision, made the same way for every provider. Its own
OpenTelemetry spans are off too: the router makes one ``llm.chat`` span per attempt, and
the SDK's environment variables must not be able to add message contents to spans.

Structured output is a forced tool: the request's JSON schema becomes the tool's
``input_schema`` and the model must call it, so the answer is the ``tool_use`` block's
``input``. Errors map onto :class:`ProviderError` kinds as :func:`status_error` says for
HTTP answers; a request that never got an answer is a ``timeout`` when it ran out of time
and ``server`` when the connection failed (refused, reset: the server is not there,
which the next candidate may well be).
"""

from __future__ import annotations

import json
import os
from typing import Any

import anthropic
import msgspec
from anthropic import types as api

from ledgerbus.agents.llm.base import ChatRequest, ChatResult, Message, ProviderError, excerpt, status_error

_STRUCTURED_TOOL = "Give your answer by calling this tool: its input is the answer, as JSON matching the schema."


class AnthropicProvider:
    """``type = "anthropic"`` in the routing file.

    The key is read from ``api_key_env`` when the provider is made; without one, every
    ``chat`` fails as ``config`` (not the constructor: an agent whose routes never reach
    this provider must start). The key goes only to the SDK's client.
    """

    def __init__(self, name: str, *, base_url: str | None = None, api_key_env: str = "ANTHROPIC_API_KEY",
                 timeout_s: float = 60.0) -> None:
        self.name = name
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        key = os.environ.get(api_key_env)
        self._client = anthropic.AsyncAnthropic(
            api_key=key, base_url=base_url, timeout=timeout_s, max_retries=0, open_telemetry=False
        ) if key else None

    async def chat(self, request: ChatRequest, *, model: str, max_tokens: int,
                   params: dict[str, Any]) -> ChatResult:
        """One ``messages.create`` call; :class:`ProviderError` for anything but a good answer."""
        if self._client is None:
            raise ProviderError.of("config", f"set {self.api_key_env} in the environment to the Anthropic API key",
                                   provider=self.name, model=model)
        # `params` (and temperature, which this SDK has no argument for) go in the body
        # as they are, so any API field works; one the API does not know is refused (400).
        body = dict(params)
        if request.temperature is not None:
            body["temperature"] = request.temperature
        messages = [_turn(m) for m in request.messages]
        tools: list[api.ToolParam] | anthropic.Omit = anthropic.omit
        tool_choice: api.ToolChoiceToolParam | anthropic.Omit = anthropic.omit
        if request.schema is not None:
            description = request.schema.get("description")
            tools = [{"name": request.schema_name, "input_schema": request.schema,
                      "description": description if isinstance(description, str) else _STRUCTURED_TOOL}]
            tool_choice = {"type": "tool", "name": request.schema_name}
        try:
            reply = await self._client.messages.create(
                model=model, max_tokens=max_tokens, messages=messages, system=request.system or anthropic.omit,
                tools=tools, tool_choice=tool_choice, extra_body=body or None,
            )
        except anthropic.APIStatusError as exc:
            detail = exc.api_message or excerpt(str(exc.body) if exc.body is not None else exc.message)
            raise status_error(exc.status_code, detail, exc.response.headers, provider=self.name,
                               model=model) from exc
        except anthropic.APITimeoutError as exc:
            raise ProviderError.of("timeout", f"no answer within {self.timeout_s:g}s", provider=self.name,
                                   model=model) from exc
        except anthropic.APIConnectionError as exc:
            raise ProviderError.of("server", f"cannot reach {self._client.base_url}: {exc.__cause__ or exc}",
                                   provider=self.name, model=model) from exc
        except (anthropic.APIResponseValidationError, json.JSONDecodeError) as exc:
            raise ProviderError.of("malformed", f"the answer is not a Messages API response: {exc}",
                                   provider=self.name, model=model) from exc
        return self._result(reply, request, model)

    def _result(self, reply: object, request: ChatRequest, model: str) -> ChatResult:
        """The result of a 200 answer, checked: without strict validation the SDK returns
        whatever came back (a string for a non-JSON body, a message missing its fields)."""
        usage = getattr(reply, "usage", None)
        content = getattr(reply, "content", None)
        tokens_in = getattr(usage, "input_tokens", None)
        tokens_out = getattr(usage, "output_tokens", None)
        if not (isinstance(reply, api.Message) and isinstance(content, list) and isinstance(tokens_in, int)
                and isinstance(tokens_out, int)):
            raise ProviderError.of("malformed", f"the answer is not a Messages API response: {excerpt(reply)}",
                                   provider=self.name, model=model)
        stop_reason = str(reply.stop_reason or "")
        data: Any = None
        if request.schema is not None:
            calls = [b for b in content if isinstance(b, api.ToolUseBlock) and b.name == request.schema_name]
            if not calls:
                raise ProviderError.of("malformed", f"no {request.schema_name} tool_use block in the answer"
                                       f" (stop_reason {stop_reason or 'none'})", provider=self.name, model=model)
            data = calls[0].input
            text = msgspec.json.encode(data).decode()
        else:
            text = "".join(b.text for b in content if isinstance(b, api.TextBlock))
        return ChatResult(text=text, data=data, provider=self.name, model=model, tokens_in=tokens_in,
                          tokens_out=tokens_out, stop_reason=stop_reason)

    async def aclose(self) -> None:
        """Close the SDK's HTTP client (its connection pool)."""
        if self._client is not None:
            await self._client.close()


def _turn(message: Message) -> api.MessageParam:
    # One literal per role: the SDK's message type is a union mypy narrows by literal.
    if message.role == "user":
        return {"role": "user", "content": message.content}
    return {"role": "assistant", "content": message.content}
