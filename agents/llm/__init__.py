"""LLM calls for skills: providers (Anthropic, any OpenAI-compatible server, scripted
answers for tests and demos), routing by skill and role, fallback.

``LLMRouter.from_file(settings.llm_config_path)`` loads the routing file (``llm.toml``);
``router.bind(skill, role, usage)`` is the :class:`LLM` a task's skill calls. The provider
SDKs are imported only when a route first reaches them.
"""

from ledgerbus.agents.llm.base import ChatRequest, ChatResult, Message, ProviderError, Usage, UsageSink
from ledgerbus.agents.llm.router import LLM, LLMRouter

__all__ = ["LLM", "ChatRequest", "ChatResult", "LLMRouter", "Message", "ProviderError", "Usage", "UsageSink"]
