"""Fake LLM APIs, good enough for the real SDK clients: Anthropic's ``POST /v1/messages``
and OpenAI's (vLLM's) ``POST /v1/chat/completions``, from one stdlib HTTP server.

A :class:`FakeLLM` answers from a script, a queue of replies: :func:`answer` (text, or
``data`` for a structured request: a ``tool_use`` block when the request carries tools,
JSON content when it carries ``response_format``), or an injected failure:
:func:`status` (an error answer in the API's own shape, ``retry-after`` included),
:func:`hang` (no answer for a while: the client's timeout) and :func:`malformed` (a 200
the SDK cannot read). When the script runs out it echoes the last user message. Token
counts are words: of the prompt (system and messages) in, of the answer out.

It records every request (:attr:`FakeLLM.requests`), headers included, so tests can check
the key arrived; it never logs them. Anthropic clients take ``base_url=fake.url``,
OpenAI ones ``fake.url + "/v1"`` (:attr:`FakeLLM.openai_url`).

It serves from a thread, so it works in an asyncio test and as a process of its own::

    python -m tests.fakellm --script replies.json --port 0 --ready-file var/fakellm.url

which writes its URL to the ready file (and stdout) once it listens, and runs until
SIGTERM or SIGINT. The script file is a JSON list of replies, e.g.
``[{"reply": "status", "code": 429, "retry_after": 2}, {"reply": "answer", "text": "hi"}]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Self

import msgspec


class Answer(msgspec.Struct, tag="answer", tag_field="reply", frozen=True, kw_only=True):
    """A good answer: ``text``, or ``data`` (any JSON) for a structured request."""

    text: str = ""
    data: Any = None


class Status(msgspec.Struct, tag="status", tag_field="reply", frozen=True, kw_only=True):
    """An HTTP error answer in the API's error shape, with ``retry-after`` if given."""

    code: int
    retry_after: float | None = None
    message: str = ""


class Hang(msgspec.Struct, tag="hang", tag_field="reply", frozen=True, kw_only=True):
    """Say nothing for ``seconds`` (then echo, if the client is still there)."""

    seconds: float


class Malformed(msgspec.Struct, tag="malformed", tag_field="reply", frozen=True, kw_only=True):
    """A 200 whose body is not the API's answer (by default a proxy's HTML page)."""

    body: str = "<html><body>upstream says hello</body></html>"
    content_type: str = "text/html"


Reply = Answer | Status | Hang | Malformed


def answer(text: str = "", *, data: Any = None) -> Answer:
    """A good answer (``data``: the object a structured request gets)."""
    return Answer(text=text, data=data)


def status(code: int, *, retry_after: float | None = None, message: str = "") -> Status:
    """An error answer: ``status(429, retry_after=2)``, ``status(500)``, ``status(400, message=...)``."""
    return Status(code=code, retry_after=retry_after, message=message)


def hang(seconds: float) -> Hang:
    """No answer for ``seconds``: longer than the client's timeout to make it time out."""
    return Hang(seconds=seconds)


def malformed(body: str | None = None, *, content_type: str = "text/html") -> Malformed:
    """A 200 the SDK cannot make an answer of (``body='{"x": 1}', content_type="application/json"``
    for JSON of the wrong shape)."""
    return Malformed(content_type=content_type) if body is None else Malformed(body=body, content_type=content_type)


API = Literal["anthropic", "openai"]
_PATHS: dict[str, API] = {"/v1/messages": "anthropic", "/v1/chat/completions": "openai"}


@dataclass(frozen=True)
class Received:
    """One request as it arrived."""

    api: API | None
    """Which API the path belongs to (``None``: neither; answered 404)."""
    path: str
    body: Any
    headers: dict[str, str] = field(repr=False)
    """Lower-case names; kept out of ``repr`` so an assertion failure does not print keys."""


class FakeLLM:
    """Both fake APIs on one port of 127.0.0.1, answering from the script in order
    (whichever API a request comes to). Use as a context manager: it serves inside."""

    def __init__(self, *script: Reply, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[Received] = []
        self._script: deque[Reply] = deque(script)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = _Server((host, port), self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fakellm-{self._server.server_address[1]}", daemon=True)
        self.url = f"http://{host}:{self._server.server_address[1]}"
        """The server's root: an Anthropic client's ``base_url``."""

    @property
    def openai_url(self) -> str:
        """An OpenAI client's ``base_url``."""
        return self.url + "/v1"

    def push(self, *replies: Reply) -> None:
        """Add replies to the end of the script."""
        with self._lock:
            self._script.extend(replies)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving; requests still hanging are let go at once."""
        self._closing.set()
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def _take(self, received: Received, reply: bool = True) -> Reply | None:
        """Record a request and pop its reply (``None``: the script is empty, or the
        request is not one the script is for)."""
        with self._lock:
            self.requests.append(received)
            return self._script.popleft() if reply and self._script else None


class _Server(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], fake: FakeLLM) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is what hang() is for, not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests look at ``requests`` instead."""

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        path = self.path.split("?", 1)[0]
        api = _PATHS.get(path)
        try:
            body: Any = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            body = raw.decode(errors="replace")
        headers = {name.lower(): value for name, value in self.headers.items()}
        received = Received(api=api, path=path, body=body, headers=headers)
        if api is None or not isinstance(body, dict):
            self.server.fake._take(received, reply=False)
            self._send(404 if api is None else 400, {"error": {"message": f"fake: cannot serve {path}"}})
            return
        reply = self.server.fake._take(received)
        if isinstance(reply, Hang):
            self.server.fake._closing.wait(reply.seconds)
            reply = None
        match reply:
            case Status():
                extra = {} if reply.retry_after is None else {"retry-after": f"{reply.retry_after:g}"}
                self._send(reply.code, _error_body(api, reply), extra)
            case Malformed():
                self._send_raw(200, reply.body.encode(), reply.content_type)
            case Answer():
                self._send(200, _answer_body(api, body, reply))
            case None:
                self._send(200, _answer_body(api, body, _echo(api, body)))

    def _send(self, code: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send_raw(code, msgspec.json.encode(payload), "application/json", headers)

    def _send_raw(self, code: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except ConnectionError:
            self.close_connection = True  # the client gave up (a hang longer than its timeout)


def _structured(api: API, body: dict[str, Any]) -> bool:
    return bool(body.get("tools")) if api == "anthropic" else "response_format" in body


def _echo(api: API, body: dict[str, Any]) -> Answer:
    """The default answer: the last user message, as text or (structured) as ``{"echo": ...}``."""
    users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    last = _text(users[-1].get("content")) if users else ""
    return Answer(data={"echo": last}) if _structured(api, body) else Answer(text=f"echo: {last}")


def _text(content: Any) -> str:
    """The text of a message's content: a string, or a list of blocks with ``text``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


def _words_in(body: dict[str, Any]) -> int:
    prompt = [_text(body.get("system"))] + [_text(m.get("content")) for m in body.get("messages") or []
                                            if isinstance(m, dict)]
    return sum(len(text.split()) for text in prompt)


def _answer_body(api: API, request: dict[str, Any], reply: Answer) -> dict[str, Any]:
    """A good answer in the API's shape, for ``request``."""
    model = str(request.get("model", ""))
    structured = reply.data is not None
    text = msgspec.json.encode(reply.data).decode() if structured else reply.text
    tokens_in, tokens_out = _words_in(request), len(text.split())
    if api == "anthropic":
        tools = request.get("tools") or []
        block: dict[str, Any]
        if structured and tools:
            block = {"type": "tool_use", "id": "toolu_fake", "name": tools[0].get("name", ""), "input": reply.data}
        else:
            block = {"type": "text", "text": text}
        return {"id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [block],
                "stop_reason": "tool_use" if block["type"] == "tool_use" else "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": tokens_in, "output_tokens": tokens_out}}
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                      "total_tokens": tokens_in + tokens_out}}


_ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                     404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}


def _error_body(api: API, reply: Status) -> dict[str, Any]:
    """An error answer in the API's shape."""
    if api == "anthropic":
        kind = _ANTHROPIC_ERRORS.get(reply.code, "api_error")
        return {"type": "error", "error": {"type": kind, "message": reply.message or f"fake {kind}"}}
    kind = "rate_limit_exceeded" if reply.code == 429 else "server_error" if reply.code >= 500 else "invalid_request"
    return {"error": {"message": reply.message or f"fake {kind}", "type": kind, "param": None, "code": None}}


def load_script(path: Path) -> list[Reply]:
    """The replies of a script file (a JSON list; see the module docstring)."""
    return msgspec.json.decode(path.read_bytes(), type=list[Reply])


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.fakellm``: serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m tests.fakellm", description="Fake Anthropic and OpenAI APIs.")
    parser.add_argument("--script", type=Path, help="a JSON list of replies (default: echo every request)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (the default): any free port")
    parser.add_argument("--ready-file", type=Path, help="where to write the URL once listening")
    args = parser.parse_args(argv)
    try:
        script = load_script(args.script) if args.script else []
    except (OSError, msgspec.DecodeError) as exc:  # ValidationError is a DecodeError
        parser.error(f"--script {args.script}: {exc}")
    # Blocked before the server thread starts, so it inherits the mask and sigwait gets them.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    with FakeLLM(*script, host=args.host, port=args.port) as fake:
        if args.ready_file:
            # Written whole, then renamed: a reader never sees half a URL.
            partial = args.ready_file.with_name(args.ready_file.name + ".tmp")
            partial.write_text(fake.url + "\n")
            os.replace(partial, args.ready_file)
        sys.stdout.write(fake.url + "\n")
        sys.stdout.flush()
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main())
