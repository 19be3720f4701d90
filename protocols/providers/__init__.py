"""Provider wire formats: one sans-I/O adapter per provider (bytes in, normalized events out).

Every adapter module has the same interface (see base.py for the full contract):

    DEFAULT_BASE_URL, PATH
    Parser().feed(chunk) -> list[event]    Parser().close() -> list[event]
    build_request(*, base_url, api_key, model, body) -> (method, url, headers, body_bytes)
    error_from_response(status, headers, body) -> error event

`get_adapter(name)` returns the module registered under a provider name in ADAPTERS;
`adapter_for(name, body)` the one that runs a given normalized body: a body that is not a
chat (embeddings, a token count) has an adapter of its own, whatever the provider's format.
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


def adapter_for(name: str, body: dict) -> ModuleType:
    """The adapter for `body` sent to a provider whose chat adapter is `name`."""
    from protocols.providers import anthropic_count_tokens, openai_embeddings

    if openai_embeddings.is_embeddings(body):
        return openai_embeddings
    if anthropic_count_tokens.is_count_tokens(body):
        return anthropic_count_tokens
    return get_adapter(name)


def get_adapter(name: str) -> ModuleType:
    """The adapter module for a provider name; KeyError naming the known ones otherwise."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise KeyError(f"unknown provider {name!r}; known: {', '.join(sorted(ADAPTERS))}") from None
