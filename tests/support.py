"""Test helpers: the process and HTTP helpers of sim/testing.py (shared with bench/),
re-exported so that test modules import them from one place."""

from __future__ import annotations

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
    "ROOT",
    "Gateway",
    "SSEClient",
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
