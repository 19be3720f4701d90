"""Shared fixtures: one real simulated provider and one real gateway per test session."""
from __future__ import annotations

import pytest

from tests.support import running_gateway, running_sim


@pytest.fixture(scope="session")
def sim():
    """The simulated provider as its own process; yields its base URL."""
    with running_sim() as url:
        yield url


@pytest.fixture(scope="session")
def gateway(sim):
    """A real `python run.py` (actor system, Pool, edge) in front of `sim`."""
    with running_gateway({"SIMULATED_BASE_URL": sim}) as gw:
        gw.sim = sim
        yield gw
