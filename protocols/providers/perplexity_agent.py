"""Perplexity Agent API (POST /v1/agent), the successor of Sonar /chat/completions.

Owns: the streaming request and the parse of its Responses-style SSE stream.
Format: https://docs.perplexity.ai/docs/agent-api/output-control (streaming) and
https://docs.perplexity.ai/api-reference/agent-post (request body). Every event is named
with an SSE `event:` line; the JSON may or may not repeat it as "type" (both handled).

    response.output_text.delta                  -> delta
    response.reasoning.started/stopped thought  -> meta(reasoning)
    response.reasoning.search_queries           -> meta(search_queries) (+ reasoning thought)
    response.reasoning.search_results,
    output item of type "search_results"        -> meta(search_results), not repeated when identical
    response.reasoning.fetch_url_queries        -> meta(fetch_url_queries)
    response.reasoning.fetch_url_results        -> meta(fetched_urls) (urls only, not page text)
    response.completed                          -> usage (input/output/total_tokens), finish "stop"
    response.failed (error at top level or in
    response.error)                             -> error
    response.completed is the terminator; close() before it -> upstream_truncated.
Everything else is openai_responses.Parser.

Request: Bearer auth; `model` when the name is provider/model (e.g. "openai/gpt-5"),
otherwise it is sent as `preset` (e.g. "fast-search", "pro-search"); system text ->
"instructions"; one user message -> `input` as a string, a conversation -> an array of
{"type": "message", "role", "content"}; max_tokens -> max_output_tokens; function tools
flattened Responses-style; tool calls and results as Responses input items. Everything
else (temperature, top_p, stop, seed, response_format, ...) is not part of the Agent API
body: base.Unsupported names it (`check`: the edge's 400), never dropped silently.
"""

from __future__ import annotations

from protocols.providers import base, openai_responses
from protocols.providers.base import error_from_response, field, opt_str

__all__ = ["DEFAULT_BASE_URL", "PATH", "Parser", "build_request", "check", "error_from_response"]

DEFAULT_BASE_URL = "https://api.perplexity.ai"
PATH = "/v1/agent"


class Parser(openai_responses.Parser):
    TERMINATOR = "response.completed"

    def __init__(self) -> None:
        super().__init__()
        self._search_results: list | None = None

    def on_event(self, kind: str, event: dict) -> None:
        if kind in ("response.reasoning.started", "response.reasoning.stopped"):
            self.meta(reasoning=opt_str(event, "thought"))
        elif kind == "response.reasoning.search_queries":
            self.meta(reasoning=opt_str(event, "thought"), search_queries=field(event, "queries", list))
        elif kind == "response.reasoning.search_results":
            self._results(field(event, "results", list))
        elif kind == "response.reasoning.fetch_url_queries":
            self.meta(fetch_url_queries=field(event, "queries", list))
        elif kind == "response.reasoning.fetch_url_results":
            results = field(event, "results", list, [])
            self.meta(fetched_urls=[r["url"] for r in results if isinstance(r, dict) and opt_str(r, "url")])
        else:
            super().on_event(kind, event)

    def on_item(self, item: dict, output_index: object, *, done: bool) -> None:
        if item.get("type") == "search_results":
            self._results(field(item, "results", list))
        else:
            super().on_item(item, output_index, done=done)

    def _results(self, results: list | None) -> None:
        if results and results != self._search_results:
            self._search_results = results
            self.meta(search_results=results)


def build_request(
    *, base_url: str, api_key: str | None, model: str, body: dict
) -> tuple[str, str, base.Headers, bytes]:
    fields = base.Fields(body, "perplexity (Agent API)")
    system, messages = base.split_system(body)
    if (
        len(messages) == 1
        and messages[0].get("role") == "user"
        and isinstance(messages[0].get("content"), str)
        and messages[0].get("name") is None
    ):
        agent_input: str | list = messages[0]["content"]
    else:
        agent_input = [
            {"type": "message", **item} if "role" in item else item
            for item in openai_responses.input_items(body.get("messages") or [], fields.provider)
        ]
    payload: dict = {("model" if "/" in model else "preset"): model, "input": agent_input, "stream": True}
    if system:
        payload["instructions"] = system
    if base.max_tokens(fields) is not None:
        payload["max_output_tokens"] = body.get("max_tokens") or body.get("max_completion_tokens")
    if fields.take("tools"):
        payload["tools"] = [openai_responses.flat_tool(t) for t in body["tools"]]
    fields.refuse_rest()
    return base.json_request(base.join_url(base_url, PATH), base.bearer(api_key), payload)


def check(body: dict) -> str | None:
    """Why `body` cannot go to the Agent API (a field named), or None."""
    return base.refusal(build_request, body)
