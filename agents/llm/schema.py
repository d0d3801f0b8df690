"""JSON schemas for structured output, from msgspec types, in the form providers take best.

msgspec writes a top-level ``$ref`` into ``$defs``; some structured-output backends
(grammar-guided decoding in vLLM, tool input schemas) handle references poorly, so the
schema is inlined: every ``$ref`` replaced by the definition it names. Recursive types
cannot be inlined and are refused.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ledgerbus.agents.errors import AgentError


def inline(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with every ``$ref`` into its ``$defs`` replaced by the definition."""
    defs = schema.get("$defs", {})

    def walk(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.removeprefix("#/$defs/")
                if name in seen:
                    raise AgentError(f"schema type {name} is recursive: it cannot be inlined")
                return walk(defs[name], (*seen, name))
            return {k: walk(v, seen) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v, seen) for v in node]
        return node

    inlined: dict[str, Any] = walk(schema, ())
    return inlined


def for_type(tp: Any) -> dict[str, Any]:
    """The inlined JSON schema of a msgspec-convertible type."""
    return inline(msgspec.json.schema(tp))
