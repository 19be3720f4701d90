"""Provider wire formats: one sans-I/O adapter per provider (bytes in, normalized events out).

Every adapter module has the same interface (see base.py for the full contract):

    DEFAULT_BASE_URL, PATH
    Parser().feed(chunk) -> list[event]    Parser().close() -> list[event]
    build_request(*, base_url, api_key, model, body) -> (method, url, headers, body_bytes)
    error_from_response(status, headers, body) -> error event

`get_adapter(name)` returns the module registered under a provider name in ADAPTERS.
"""

from __future__ import annotations

from types import ModuleType

from protocols.providers import anthropic, ollama, openai_chat, openai_responses, perplexity_agent, perplexity_sonar

ADAPTERS: dict[str, ModuleType] = {
    "openai": openai_chat,
    "openai_responses": openai_responses,
    "anthropic": anthropic,
    "perplexity": perplexity_agent,
    "perplexity_sonar": perplexity_sonar,
    "ollama": ollama,
    "simulated": openai_chat,
}


def get_adapter(name: str) -> ModuleType:
    """The adapter module for a provider name; KeyError naming the known ones otherwise."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise KeyError(f"unknown provider {name!r}; known: {', '.join(sorted(ADAPTERS))}") from None
