"""The HTTP gateway (``agentctl web``): the client's calls over HTTP, docs/web.md."""
