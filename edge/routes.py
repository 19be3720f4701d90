"""Every HTTP route of the edge, assembled in one place.

Each group of routes lives in a module of its own and exposes `routes(edge) -> list[Route]`:
edge/app.py (chat, health, metrics), edge/threads.py (chat threads),
edge/openai_compat.py (the OpenAI-compatible API), edge/admin_routes.py (operators).
"""
from __future__ import annotations

import importlib

from edge.app import Edge, create_app

ROUTE_MODULES = ("edge.threads", "edge.openai_compat", "edge.admin_routes")


def build_app(settings: dict):
    """The Starlette app and its Edge state (run.py needs the Edge for shutdown)."""
    extra = []
    app, edge = create_app(settings, extra)
    for name in ROUTE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # that group of routes is not built yet
        extra.extend(module.routes(edge))
    app.router.routes.extend(extra)
    return app, edge


__all__ = ["build_app", "Edge"]
