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
flattened Responses-style; tool calls and results as Responses input items (a result also
carries the called function's `name`, which some of the models behind the Agent API need;
an assistant's text parts are `input_text`, the only text part the Agent API takes);
response_format json_schema as it is (the Agent API takes chat's shape); reasoning_effort
(low, medium, high) -> reasoning.effort. Everything else (temperature, top_p, stop, seed,
tool_choice, json_object, an image `detail`, ...) is not part of the Agent API body:
base.Unsupported names it (`check`: the edge's 400), never dropped silently.

Checked (docs/providers.md "Cross-format mappings, as checked") against the request
schema of Perplexity's official SDK (perplexityai/perplexity-py, generated from
Perplexity's OpenAPI spec: ResponseCreateParams, InputItemParam, FunctionToolParam,
ResponseFormat, JsonSchemaFormat) and docs.perplexity.ai/docs/agent-api (define the run,
output control): the body has input, instructions, max_output_tokens, max_steps, model /
models / preset, reasoning.effort, response_format (json_schema only), tools, stream, and
no sampling or stop parameters.
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
        agent_input = _items(body.get("messages") or [], fields.provider)
    payload: dict = {("model" if "/" in model else "preset"): model, "input": agent_input, "stream": True}
    if system:
        payload["instructions"] = system
    if base.max_tokens(fields) is not None:
        payload["max_output_tokens"] = body.get("max_tokens") or body.get("max_completion_tokens")
    if fields.take("tools"):
        payload["tools"] = [openai_responses.flat_tool(t) for t in body["tools"]]
    fmt = fields.take("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        payload["response_format"] = fmt
    elif fmt is not None and fmt != {"type": "text"}:
        raise fields.refuse("response_format", "the Agent API takes json_schema, not JSON mode (json_object)")
    effort = fields.take("reasoning_effort")
    if effort is not None:
        if effort not in EFFORTS:
            raise fields.refuse("reasoning_effort", f"the Agent API's efforts are {', '.join(EFFORTS)}")
        payload["reasoning"] = {"effort": effort}
    fields.refuse_rest()
    return base.json_request(base.join_url(base_url, PATH), base.bearer(api_key), payload)


EFFORTS = ("low", "medium", "high")


def _items(messages: list[dict], provider: str) -> list[dict]:
    """Responses input items as the Agent API takes them (the module docstring)."""
    names = {
        call.get("id"): (call.get("function") or {}).get("name")
        for msg in messages
        for call in msg.get("tool_calls") or []
    }
    items = []
    for item in openai_responses.input_items(messages, provider):
        if "role" in item:
            item = {"type": "message", **item}
            if isinstance(item["content"], list):
                item["content"] = [_part(part, provider) for part in item["content"]]
        elif item.get("type") == "function_call_output" and names.get(item.get("call_id")):
            item["name"] = names[item["call_id"]]
        items.append(item)
    return items


def _part(part: dict, provider: str) -> dict:
    if part.get("type") == "output_text":
        return {**part, "type": "input_text"}
    if part.get("type") == "input_image" and "detail" in part:
        if part["detail"] != "auto":
            raise base.Unsupported(f"an image's 'detail' cannot be sent to {provider}: its image parts have none")
        return {k: v for k, v in part.items() if k != "detail"}
    return part


def check(body: dict) -> str | None:
    """Why `body` cannot go to the Agent API (a field named), or None."""
    return base.refusal(build_request, body)
