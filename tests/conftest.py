"""Shared fixtures: one real simulated provider and one real gateway per test session."""
from __future__ import annotations

import pytest

from tests.support import running_gateway


@pytest.fixture(scope="session")
def sim():
    """The simulated provider as its own process; yields its base URL."""
    from sim.provider import start_subprocess, stop_subprocess

    proc, port = start_subprocess(port=0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_subprocess(proc)


@pytest.fixture(scope="session")
def gateway(sim):
    """A real `python run.py` (actor system, Pool, edge) in front of `sim`."""
    with running_gateway({"SIMULATED_BASE_URL": sim}) as gw:
        gw.sim = sim
        yield gw
