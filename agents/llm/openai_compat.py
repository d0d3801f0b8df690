"""Any OpenAI-compatible chat completions server, through the official ``openai`` SDK:
OpenAI itself, vLLM, Ollama, llama.cpp's server (``type = "openai"``, and ``"vllm"``, its
older name, in the routing file).

The public OpenAI API needs a key: without one, every ``chat`` fails as ``config`` naming
the variable (at call time, not in the constructor: an agent whose routes never reach this
provider must start; the router then falls through to the next candidate). A local server
usually ignores the key (vLLM unless started with ``--api-key``); the SDK insists on one,
so an unset key is sent there as ``EMPTY`` (vLLM's own convention). As with Anthropic, the
SDK's retries are off: the router decides.

Structured output uses ``response_format`` ``json_schema`` (strict), which OpenAI enforces
and vLLM turns into guided decoding; the answer's content is then JSON, decoded into
``data``. Errors map onto :class:`ProviderError` kinds as for Anthropic: HTTP answers by
:func:`status_error`, no answer in time ``timeout``, no connection ``server``.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit

import msgspec
import openai
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema

from ledgerbus.agents.llm.base import ChatRequest, ChatResult, Message, ProviderError, excerpt, status_error

_NO_KEY = "EMPTY"

OPENAI_BASE_URL = "https://api.openai.com/v1"
"""Where ``type = "openai"`` goes without a ``base_url``: the public OpenAI API."""

_OPENAI_HOST = "api.openai.com"


class OpenAIProvider:
    """``type = "openai"`` (or ``"vllm"``) in the routing file: ``base_url`` is the
    server's OpenAI-compatible ``/v1`` root.

    The key is read from ``api_key_env`` when the provider is made. It is required only
    by the public OpenAI API (``base_url`` on ``api.openai.com``); any other server gets
    ``EMPTY`` when the variable is unset. The key goes only to the SDK's client.
    """

    def __init__(self, name: str, *, base_url: str = OPENAI_BASE_URL, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 60.0) -> None:
        self.name = name
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        key = os.environ.get(api_key_env)
        self._client = None if not key and needs_key(base_url) else openai.AsyncOpenAI(
            api_key=key or _NO_KEY, base_url=base_url, timeout=timeout_s, max_retries=0)

    async def chat(self, request: ChatRequest, *, model: str, max_tokens: int,
                   params: dict[str, Any]) -> ChatResult:
        """One ``chat.completions.create`` call; :class:`ProviderError` for anything but a good answer."""
        if self._client is None:
            raise ProviderError.of("config", f"set {self.api_key_env} in the environment to the OpenAI API key"
                                   f" ({_OPENAI_HOST} needs one; a local OpenAI-compatible server does not)",
                                   provider=self.name, model=model)
        messages: list[ChatCompletionMessageParam] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages += [_turn(m) for m in request.messages]
        response_format: ResponseFormatJSONSchema | openai.Omit = openai.omit
        if request.schema is not None:
            response_format = {"type": "json_schema",
                               "json_schema": {"name": request.schema_name, "schema": request.schema, "strict": True}}
        try:
            reply = await self._client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, response_format=response_format,
                temperature=openai.omit if request.temperature is None else request.temperature,
                # A server's own sampling fields (vLLM's top_k, repetition_penalty...) are not SDK arguments.
                extra_body=params or None,
            )
        except openai.APIStatusError as exc:
            raise status_error(exc.status_code, _detail(exc.body, exc.message), exc.response.headers,
                               provider=self.name, model=model) from exc
        except openai.APITimeoutError as exc:
            raise ProviderError.of("timeout", f"no answer within {self.timeout_s:g}s", provider=self.name,
                                   model=model) from exc
        except openai.APIConnectionError as exc:
            raise ProviderError.of("server", f"cannot reach {self._client.base_url}: {exc.__cause__ or exc}",
                                   provider=self.name, model=model) from exc
        except (openai.APIResponseValidationError, json.JSONDecodeError) as exc:
            raise ProviderError.of("malformed", f"the answer is not a chat completion: {exc}",
                                   provider=self.name, model=model) from exc
        return self._result(reply, request, model)

    def _result(self, reply: object, request: ChatRequest, model: str) -> ChatResult:
        """The result of a 200 answer, checked: without strict validation the SDK returns
        whatever came back (a string for a non-JSON body, a completion missing its fields)."""
        choices = getattr(reply, "choices", None)
        message = getattr(choices[0], "message", None) if isinstance(choices, list) and choices else None
        text = getattr(message, "content", None)
        if not (isinstance(reply, ChatCompletion) and isinstance(text, str)):
            raise ProviderError.of("malformed", f"the answer is not a chat completion with content: {excerpt(reply)}",
                                   provider=self.name, model=model)
        stop_reason = str(reply.choices[0].finish_reason or "")
        data: Any = None
        if request.schema is not None:
            try:
                data = msgspec.json.decode(text)
            except msgspec.DecodeError as exc:
                raise ProviderError.of("malformed", f"content is not JSON (finish_reason {stop_reason or 'none'}):"
                                       f" {excerpt(text)}", provider=self.name, model=model) from exc
        # OpenAI and vLLM report usage; a server that does not is not worth failing the call over.
        usage = getattr(reply, "usage", None)
        tokens_in = getattr(usage, "prompt_tokens", 0)
        tokens_out = getattr(usage, "completion_tokens", 0)
        return ChatResult(text=text, data=data, provider=self.name, model=model,
                          tokens_in=tokens_in if isinstance(tokens_in, int) else 0,
                          tokens_out=tokens_out if isinstance(tokens_out, int) else 0, stop_reason=stop_reason)

    async def aclose(self) -> None:
        """Close the SDK's HTTP client (its connection pool)."""
        if self._client is not None:
            await self._client.close()


def needs_key(base_url: str) -> bool:
    """Whether a server refuses calls without a key: the public OpenAI API does; a local
    OpenAI-compatible server (vLLM, Ollama, llama.cpp) is assumed not to."""
    return urlsplit(base_url).hostname == _OPENAI_HOST


def _turn(message: Message) -> ChatCompletionMessageParam:
    # One literal per role: the SDK's message type is a union mypy narrows by literal.
    if message.role == "user":
        return {"role": "user", "content": message.content}
    return {"role": "assistant", "content": message.content}


def _detail(body: object, message: str) -> str:
    """The server's error message: the SDK hands over ``error`` of an OpenAI-shaped body,
    and older vLLM puts ``message`` at the top level; anything else is excerpted."""
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return excerpt(body if body is not None else message)
