"""run.py's keeper while run.py waits for the first complete directory (actors/keeper.py;
docs/reliability.md, "A Supervisor lost during startup"), driven without an actor system:
the keeper's turn (`_find_or_replace`, `_remember_directory`) with a recorded Thespian
context whose global name answers with the Supervisor the test chooses.

- run.py's Supervisor dead before a complete directory (its pid gone, or a new actor under
  its global name): the keeper wires no replacement (it would create every role beside
  the actors the dead one created) and `wait_for_directory` raises
  `SupervisorLostAtStart`, so that run.py starts the actor system again;
- once `wait_for_directory` has returned (a complete directory, or run.py gave up waiting
  and serves), a lost Supervisor is replaced, wired with the directory the keeper has.
The real processes: tests/test_crashes.py
`test_a_supervisor_killed_before_its_actors_are_up_leaves_no_second_actor_of_any_role`.
"""

from __future__ import annotations

import pytest

from actors import addressing, keeper
from actors.keeper import SupervisorKeeper, SupervisorLostAtStart
from protocols import config, roles
from protocols import messages as m

pytestmark = pytest.mark.unit

FIRST = "127.0.0.1:1900"  # run.py's Supervisor
SETTINGS = config.load({"SIMULATED_BASE_URL": "http://127.0.0.1:9"})


class RecordedContext:
    """The keeper's `asys.private()` context: the global name answers with `supervisor`,
    which answers GetState with `state` (None: no answer) and GetDirectory with
    `directory`; what is told is recorded."""

    def __init__(self, state: dict | None, directory: m.Directory | None = None):
        self.supervisor, self.state, self.directory = FIRST, state, directory
        self.told: list[tuple[str, object]] = []

    def createActor(self, actor_class, globalName=None):
        assert globalName == roles.SUPERVISOR_NAME
        return addressing.from_string(self.supervisor)

    def ask(self, address, msg, timeout):
        asked = m.decode(msg)
        if isinstance(asked, m.GetState) and self.state is not None:
            return m.encode(m.State(roles.SUPERVISOR, self.state))
        if isinstance(asked, m.GetDirectory) and self.directory is not None:
            return m.encode(self.directory)
        return None

    def tell(self, address, msg):
        self.told.append((addressing.to_string(address), m.decode(msg)))


@pytest.fixture
def pids(monkeypatch):
    """The pids alive now (the keeper's /proc read)."""
    live: set[int] = set()
    monkeypatch.setattr(keeper, "alive", lambda pid: pid in live)
    return live


def waiting_keeper(context: RecordedContext, pids: set[int]) -> SupervisorKeeper:
    """A keeper that has found run.py's Supervisor (pid 100, wired), as run.py waits."""
    kept = SupervisorKeeper(None, SETTINGS, first=addressing.from_string(FIRST))
    pids.add(100)
    kept._find_or_replace(context)
    assert kept.pid == 100 and kept.lost_at_start is None
    return kept


def complete_directory() -> m.Directory:
    entries = {"pool": "127.0.0.1:2001", "pacer:simulated": "127.0.0.1:2002", roles.SUPERVISOR: FIRST}
    return m.Directory(entries, ["127.0.0.1", 7000], {"complete": True}, 3)


def test_a_supervisor_that_died_before_the_first_directory_is_not_replaced_but_reported(pids):
    context = RecordedContext({"wired": True, "pid": 100})
    kept = waiting_keeper(context, pids)
    pids.discard(100)
    context.supervisor, context.state = "127.0.0.1:1901", {"wired": False, "pid": 101}  # what a new one would be

    kept._find_or_replace(context)

    assert context.told == [], "a replacement was wired: it would create every role a second time"
    with pytest.raises(SupervisorLostAtStart, match="pid 100"):
        kept.wait_for_directory(0)


def test_a_new_supervisor_under_the_global_name_before_the_first_answer_counts_as_lost(pids):
    """run.py's Supervisor died before it answered the keeper (its pid never known)."""
    context = RecordedContext({"wired": False, "pid": 101})
    context.supervisor = "127.0.0.1:1901"
    kept = SupervisorKeeper(None, SETTINGS, first=addressing.from_string(FIRST))

    kept._find_or_replace(context)

    assert context.told == [] and kept.pid is None
    with pytest.raises(SupervisorLostAtStart, match="global name"):
        kept.wait_for_directory(0)


def test_run_pys_supervisor_not_wired_yet_is_wired_as_before(pids):
    """run.py's Wire may reach its Supervisor after the keeper's GetState: the keeper's
    Wire (the same, empty directory) is no replacement."""
    context = RecordedContext({"wired": False, "pid": 100})
    kept = SupervisorKeeper(None, SETTINGS, first=addressing.from_string(FIRST))
    pids.add(100)

    kept._find_or_replace(context)

    assert [(to, msg.directory) for to, msg in context.told] == [(FIRST, {})]
    assert kept.pid == 100 and kept.lost_at_start is None


def test_after_the_first_directory_a_lost_supervisor_is_replaced_and_adopts_it(pids):
    context = RecordedContext({"wired": True, "pid": 100}, complete_directory())
    kept = waiting_keeper(context, pids)
    kept._remember_directory(context)
    assert kept.wait_for_directory(0) is True
    pids.discard(100)
    context.supervisor, context.state = "127.0.0.1:1901", {"wired": False, "pid": 101}

    kept._find_or_replace(context)

    assert [(to, msg.directory) for to, msg in context.told] == [("127.0.0.1:1901", complete_directory().entries)]
    assert kept.pid == 101 and kept.lost_at_start is None


def test_once_run_py_serves_without_a_directory_a_lost_supervisor_is_replaced(pids):
    """run.py gave up waiting (DIRECTORY_WITHIN_S) and serves: a loss is repaired as
    before, there is no start left to fail."""
    context = RecordedContext({"wired": True, "pid": 100})
    kept = waiting_keeper(context, pids)
    assert kept.wait_for_directory(0) is False
    pids.discard(100)
    context.supervisor, context.state = "127.0.0.1:1901", {"wired": False, "pid": 101}

    kept._find_or_replace(context)

    assert [to for to, _ in context.told] == ["127.0.0.1:1901"] and kept.pid == 101
