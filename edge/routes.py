"""Every HTTP route of the edge, assembled in one place."""
from __future__ import annotations

from edge.app import Edge, create_app


def build_app(settings: dict):
    """The Starlette app and its Edge state (run.py needs the Edge for shutdown)."""
    app, edge = create_app(settings)
    return app, edge


__all__ = ["build_app", "Edge"]
