"""Every HTTP route of the edge, assembled in one place.

Each group of routes lives in a module of its own and exposes `routes(edge) -> list[Route]`:
edge/app.py (chat, health, metrics), edge/threads.py (chat threads), edge/models.py
(`/v1/models`, `/v1/models/{id}`), edge/openai_compat.py (`/v1/chat/completions`),
edge/responses_compat.py (`/v1/responses`), edge/anthropic_compat.py (`/v1/messages`, `/v1/messages/count_tokens`),
edge/embeddings.py (`/v1/embeddings`), edge/admin_routes.py (operators), edge/web.py (the
chat page, the dashboard and its live feed). edge/cors.py answers browsers' preflights
for every API route when SLUICE_CORS_ORIGINS allows the origin.
"""

from __future__ import annotations

from edge import admin_routes, anthropic_compat, embeddings, models, openai_compat, responses_compat, threads, web
from edge.access_log import AccessLog
from edge.app import Edge, create_app
from edge.cors import Cors
from protocols.gateway_settings import Settings


def build_app(settings: Settings):
    """The Starlette app and its Edge state (run.py needs the Edge for shutdown)."""
    app, edge = create_app(settings)
    modules = (threads, models, openai_compat, responses_compat, anthropic_compat, embeddings, admin_routes, web)
    for module in modules:
        app.router.routes.extend(module.routes(edge))
    if settings.cors_origins:
        app.add_middleware(Cors, origins=list(settings.cors_origins))
    if settings.access_log:
        app.add_middleware(AccessLog, log_prompts=settings.log_prompts, body_limit=settings.max_body_bytes)
    return app, edge


__all__ = ["build_app", "Edge"]
