"""Shared fixtures (one real simulated provider and one real gateway per test session) and
the marker guard: every test says what kind it is (pyproject's `markers`), so that
`make test-fast` (`-m "not integration"`) runs everything that starts no process."""

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


KINDS = ("unit", "simulation", "integration")
# Fixtures that start processes: a test using one is an integration test whatever else it is.
PROCESS_FIXTURES = {"sim", "gateway"}


def pytest_collection_modifyitems(config, items):
    """Fail the run when a test has no kind marker, or uses a process fixture without
    being marked integration (it would run in `make test-fast`)."""
    problems = []
    for item in items:
        kinds = {kind for kind in KINDS if item.get_closest_marker(kind)}
        if not kinds:
            problems.append(f"{item.nodeid}: no marker; set `pytestmark = pytest.mark.<{'|'.join(KINDS)}>`")
        elif PROCESS_FIXTURES & set(item.fixturenames) and "integration" not in kinds:
            problems.append(f"{item.nodeid}: uses a process fixture; mark it integration")
    if problems:
        raise pytest.UsageError("tests without an honest kind marker:\n  " + "\n  ".join(problems))
