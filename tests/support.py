"""Test helpers: the process and HTTP helpers of sim/testing.py (shared with bench/),
re-exported so that test modules import them from one place; and the operator's side of a
gateway (an admin token, the /api/admin routes) that several test modules drive."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from sim.testing import (
    ROOT,
    Gateway,
    SSEClient,
    alive,
    chat_body,
    data_events,
    descendants,
    free_port,
    get_json,
    listening_ports,
    port_in_use,
    request,
    running_gateway,
    running_sim,
    stream_chat,
    wait_until,
)

__all__ = [
    "ADMIN_AUTH",
    "ADMIN_TOKEN",
    "ROOT",
    "Gateway",
    "SSEClient",
    "admin",
    "admin_gateway",
    "admin_state",
    "alive",
    "chat_body",
    "data_events",
    "descendants",
    "free_port",
    "get_json",
    "listening_ports",
    "port_in_use",
    "request",
    "running_gateway",
    "running_sim",
    "stream_chat",
    "wait_until",
]

ADMIN_TOKEN = "test-admin-token"
ADMIN_AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@contextmanager
def admin_gateway(sim: str) -> Iterator[Gateway]:
    """A gateway of its own in front of `sim` that takes ADMIN_TOKEN on /api/admin (a test
    module that changes settings must not share the session's `gateway`)."""
    with running_gateway({"SIMULATED_BASE_URL": sim, "SLUICE_ADMIN_TOKEN": ADMIN_TOKEN}) as gateway:
        yield gateway


def admin(gw: Gateway, method: str, path: str, body=None, headers=ADMIN_AUTH) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of /api/admin<path>, with the admin token unless told."""
    status, hdrs, raw = request(method, gw.url + "/api/admin" + path, body=body, headers=headers)
    return status, hdrs, json.loads(raw)


def admin_state(gw: Gateway) -> dict:
    """What every actor reports (GET /api/admin/state); fails unless it answers 200."""
    status, _, data = admin(gw, "GET", "/state")
    assert status == 200, data
    return data
