"""Which provider and model a client's `model` names, and the models clients are shown.

A client of any front end (sluice's, OpenAI's, Anthropic's) names a model only; sluice
resolves it here, in one place (`Edge.admit` calls `resolve`), so no client needs a
sluice-specific name or a `provider` field:

- an explicit provider (sluice's `provider` field): `model` is that provider's model
  (None: its configured model);
- an alias from SLUICE_MODEL_ALIASES (`gpt-4o=openai/gpt-4o`): its provider and model;
- `provider/model` whose first segment is a sluice provider name: that provider, that
  model (`anthropic/claude-sonnet-4-5`, `perplexity/openai/gpt-5`); a bare provider name:
  its configured model;
- anything else: a model of the default provider (SLUICE_PROVIDER), passed on as named.

`GET /v1/models` lists every configured provider's model as `provider/model` and every
alias (only those the caller's API key may use). `GET /v1/models/{id}` answers for every
id chat accepts by name: the listed ids, a configured provider's name, `provider/anything`
of a configured provider, and the default provider's model by its bare name; any other id
is a 404 in OpenAI's shape (chat still passes an unknown bare name to the default
provider, which then decides).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edge.openai_compat import error_response
from protocols.config import PROVIDERS
from protocols.gateway_settings import Settings

# The longest model name a request may give (after its provider prefix): longer than any
# provider's ids, short enough to be a metrics label. Unbounded, five requests naming 200 KB
# models made /metrics 104 MB (each series repeats its labels; the first 50 models of a
# provider are kept as labels).
MAX_MODEL_CHARS = 256


def resolve(provider: str | None, model: str | None, settings: Settings) -> tuple[str | None, str | None]:
    """(provider, model) for a request; None means the configured default."""
    if provider is not None or not model:
        return provider, model
    target = settings.model_aliases.get(model)
    if target is not None:
        return target[0], target[1]
    head, _, rest = model.partition("/")
    if head in PROVIDERS:
        return head, rest or None
    return None, model


def route(model: str | None, settings: Settings) -> tuple[str, str | None, str]:
    """(provider, upstream model, adapter name) for a request that names only a model: the
    endpoints that some adapters serve (embeddings, token counts) check the adapter first."""
    provider, upstream = resolve(None, model, settings)
    provider = provider or settings.provider
    adapter = p.adapter if (p := settings.providers.get(provider)) else provider
    return provider, upstream, adapter


def _entry(model_id: str, owner: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner}


def listing(settings: Settings, allows) -> list[dict]:
    """The model objects a client may use: `allows(provider, model) -> bool` (its key's)."""
    out = [_entry(f"{name}/{p.model}", name) for name, p in settings.providers.items() if allows(name, p.model)]
    for alias, (name, model) in settings.model_aliases.items():
        if allows(name, model):
            out.append(_entry(alias, name))
    return out


def lookup(model_id: str, settings: Settings, allows) -> dict | None:
    """The model object for `model_id` if chat accepts it by name (module docstring)."""
    providers = settings.providers
    provider, model = resolve(None, model_id, settings)
    named = provider is not None  # an alias or a provider/... id
    provider = provider or settings.provider
    configured = providers.get(provider)
    if configured is None:
        return None
    model = model or configured.model
    if not named and model != configured.model:
        return None  # a bare name sluice does not know
    return _entry(model_id, provider) if allows(provider, model) else None


def routes(edge) -> list[Route]:
    def allows_for(request: Request):
        key_id = request.state.key_id
        return lambda provider, model: edge.keys.allows(key_id, provider, model)

    async def models(request: Request):
        if (denied := edge.authenticate(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": listing(edge.settings, allows_for(request))})

    async def model(request: Request):
        if (denied := edge.authenticate(request)) is not None:
            return denied
        wanted = request.path_params["model_id"]
        found = lookup(wanted, edge.settings, allows_for(request))
        if found is None:
            return error_response(404, "model_not_found", f"The model {wanted!r} does not exist (see GET /v1/models)")
        return JSONResponse(found)

    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
    ]
