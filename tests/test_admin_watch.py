"""The orphan watch in Thespian's admin (patches/thespian_admin_watch.py, actors/system.py
`watch_from_admin`, run.py `_Watchdog`; docs/reliability.md "The orphan watch"), without
an actor system: the arming and the admin class the patch hands to Thespian's
`startAdmin`, the thread's signal mask, the admin found in a process table, what the
watch does once its parent is gone, and when run.py starts the watchdog process.
The real processes: tests/test_lifecycle.py (a gateway with no watchdog process; run.py
SIGKILLed; the admin SIGKILLed, then run.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import run
from actors import system
from actors.system import Proc
from patches import thespian_admin_watch

pytestmark = pytest.mark.unit

GROUP = 500  # the daemonizing child's pid: the system's process group
WATCH_ADMIN_EXIT = run._Watchdog._watch_admin_exit


def proc(parent: int, group: int = GROUP, state: str = "S") -> Proc:
    return Proc(parent, group, GROUP, state)


# --- finding the admin -----------------------------------------------------------------------


def test_the_admin_is_the_member_whose_parent_is_outside_the_group():
    table = {
        GROUP: proc(400, state="Z"),  # the daemonizing child, a zombie of run.py (400)
        501: proc(1),  # the admin, reparented
        502: proc(501),  # the Supervisor
        503: proc(502),  # an actor the Supervisor created
        600: proc(1, group=600),  # a process of another group
    }
    assert system.admin_pid(GROUP, table) == 501


def test_the_admin_is_found_while_the_daemonizing_child_has_not_exited_yet():
    table = {GROUP: proc(400), 501: proc(GROUP)}
    assert system.admin_pid(GROUP, table) == 501


def test_no_admin_when_the_group_is_empty_or_has_several_roots():
    assert system.admin_pid(GROUP, {GROUP: proc(400, state="Z")}) is None
    # The admin gone: its orphaned actors' parents are outside the group; none is the admin.
    assert system.admin_pid(GROUP, {502: proc(1), 503: proc(1)}) is None
    assert system.admin_pid(GROUP, {501: proc(1, state="Z"), 502: proc(1)}) == 502  # a dead member is no member


# --- the patch: arming, the admin class, the thread ---------------------------------------------


class FakeAdmin:
    """Stands for Thespian's MultiProcAdmin: records its arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


@pytest.fixture
def fake_start_admin(monkeypatch):
    """Thespian's startAdmin replaced by one that constructs the admin and names the process
    after its class, as the real one does after daemonizing; -> what it saw."""
    seen: dict = {}

    def start_admin(adminClass, *args):
        seen["name"] = adminClass.__name__
        seen["admin"] = adminClass("transport", "address", kw="arg")
        seen["args"] = args

    monkeypatch.setattr(thespian_admin_watch, "_original", start_admin)
    monkeypatch.setattr(thespian_admin_watch, "_armed", None)
    return seen


def test_an_unarmed_admin_is_thespians_own(fake_start_admin, monkeypatch):
    started: list = []
    monkeypatch.setattr(thespian_admin_watch, "start_watch", started.append)
    thespian_admin_watch._start_admin(FakeAdmin, "starter", "endpoint")
    assert fake_start_admin["name"] == "FakeAdmin" and fake_start_admin["args"] == ("starter", "endpoint")
    assert type(fake_start_admin["admin"]) is FakeAdmin and started == []


def test_an_armed_admin_starts_the_watch_once_constructed_and_disarms(fake_start_admin, monkeypatch):
    started: list = []
    monkeypatch.setattr(thespian_admin_watch, "start_watch", started.append)

    def watch():
        pass

    with thespian_admin_watch.armed(watch):
        assert thespian_admin_watch._armed is watch
        thespian_admin_watch._start_admin(FakeAdmin, "starter", "endpoint")
    admin = fake_start_admin["admin"]
    assert type(admin) is FakeAdmin and admin.args == ("transport", "address") and admin.kwargs == {"kw": "arg"}
    assert fake_start_admin["name"] == "FakeAdmin"  # Thespian names the admin's process after it
    assert started == [watch]
    assert thespian_admin_watch._armed is None  # only the ActorSystem(...) inside the block


def test_an_admin_that_cannot_be_constructed_starts_no_watch(fake_start_admin, monkeypatch):
    started: list = []
    monkeypatch.setattr(thespian_admin_watch, "start_watch", started.append)

    class TakenAddress(FakeAdmin):
        def __init__(self, *args, **kwargs):
            raise OSError("address in use")

    with thespian_admin_watch.armed(lambda: None), pytest.raises(OSError):
        thespian_admin_watch._start_admin(TakenAddress, "starter")
    assert started == []


def test_the_watch_thread_takes_no_signal_and_the_caller_keeps_its_mask(monkeypatch):
    monkeypatch.setattr(thespian_admin_watch, "_armed", lambda: None)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    seen: dict = {}

    def watch():
        seen["mask"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        seen["daemon"] = threading.current_thread().daemon

    thread = thespian_admin_watch.start_watch(watch)
    thread.join(5)
    assert {signal.SIGCHLD, signal.SIGTERM, signal.SIGUSR1, signal.SIGINT} <= seen["mask"]
    assert seen["daemon"] is True
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert thespian_admin_watch._armed is None  # nothing forked from the admin inherits it


def test_armed_says_whether_the_patch_is_in_force(monkeypatch):
    monkeypatch.setattr(thespian_admin_watch, "installed", lambda: False)
    with thespian_admin_watch.armed(lambda: None) as in_force:
        assert in_force is False


# --- the watch and the stop command -------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


class StopCommand:
    """What `start_stop` returns, as far as the watch uses it: a stop that ends at once, or
    one that is still running when the watch stops waiting for it."""

    def __init__(self, ends: bool):
        self.ends, self.waited = ends, []

    def wait(self, timeout=None):
        self.waited.append(timeout)
        if not self.ends:
            raise subprocess.TimeoutExpired("stop", timeout)
        return -signal.SIGKILL


@pytest.fixture
def killed_groups(monkeypatch) -> list:
    """Record the watch's `kill_group` calls (the real one would SIGKILL this test's group)."""
    killed: list = []
    monkeypatch.setattr(system, "kill_group", lambda group, grace_s: killed.append((group, grace_s)))
    return killed


def test_the_admins_watch_starts_the_stop_command_for_its_group_once_its_parent_is_gone(monkeypatch, killed_groups):
    stops: list = []
    monkeypatch.setattr(system, "start_stop", lambda *args: stops.append(args) or StopCommand(ends=True))
    system.watch_from_admin(dead_pid(), "127.0.0.1", 1900)
    assert stops == [("127.0.0.1", 1900, os.getpgrp())]


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfd: the watch polls")
def test_the_admins_watch_wakes_the_moment_its_parent_exits_not_at_its_next_poll(monkeypatch, killed_groups):
    """run.py killed, then the admin within the poll's 0.5 s, left the actors running."""
    monkeypatch.setattr(system, "WATCH_EVERY_S", 3600.0)  # only the pidfd can wake it in time
    stops: list = []
    monkeypatch.setattr(system, "start_stop", lambda *args: stops.append(args) or StopCommand(ends=True))
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watch = threading.Thread(target=system.watch_from_admin, args=(parent.pid, "127.0.0.1", 1900), daemon=True)
        watch.start()
        parent.kill()
        watch.join(30)
        assert not watch.is_alive() and stops == [("127.0.0.1", 1900, os.getpgrp())]
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.parametrize("ends", [True, False], ids=["stop command killed", "stop command stuck"])
def test_a_stop_command_that_did_not_stop_the_system_gets_the_group_killed(monkeypatch, killed_groups, ends):
    """A stop that works ends the admin, this watch with it; a watch still running once its
    stop command has ended (SIGKILLed, say) or has run past STOP_WITHIN_S kills the group."""
    command = StopCommand(ends)
    monkeypatch.setattr(system, "start_stop", lambda *args: command)
    system.watch_from_admin(dead_pid(), "127.0.0.1", 1900)
    assert command.waited == [system.STOP_WITHIN_S]
    assert killed_groups == [(os.getpgrp(), 0)]


def test_a_stop_command_that_cannot_be_started_is_tried_again_then_the_group_is_killed(monkeypatch, killed_groups):
    tries: list = []

    def no_fork(*args):
        tries.append(args)
        raise BlockingIOError(11, "Resource temporarily unavailable")  # fork's EAGAIN

    monkeypatch.setattr(system, "start_stop", no_fork)
    monkeypatch.setattr(system, "STOP_TRIES_S", 0.2)
    monkeypatch.setattr(system, "WATCH_EVERY_S", 0.01)
    system.watch_from_admin(dead_pid(), "127.0.0.1", 1900)
    assert len(tries) > 1 and killed_groups == [(os.getpgrp(), 0)]


def test_alive_says_dead_only_for_a_process_that_is_gone_or_left_its_group(monkeypatch):
    me = os.getpid()
    assert system.alive(me) and system.alive(me, os.getpgrp())
    assert not system.alive(me, os.getpgrp() + 1), "a reused pid in another group"
    gone = dead_pid()
    assert not system.alive(gone)

    def out_of_descriptors(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr("builtins.open", out_of_descriptors)
    assert system.alive(gone), "EMFILE cannot tell: alive"


def test_the_stop_command_takes_the_signals_its_starter_blocked(monkeypatch):
    monkeypatch.setattr(system, "stop_from_outside", lambda *args: 0)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
    try:
        assert system.main(["stop", "127.0.0.1", "1900", "12345"]) == 0
        assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def test_the_stop_command_and_the_watchdog_get_the_secret_in_their_environment_only(monkeypatch):
    launched: list = []

    class Recorded:
        def __init__(self, args, **kwargs):
            launched.append((args, kwargs))

    monkeypatch.setattr(system.subprocess, "Popen", Recorded)
    monkeypatch.setattr(system.cluster_secret, "get", lambda: b"the-secret")
    system.start_stop("127.0.0.1", 1900, GROUP)
    system.start_watchdog(4242, "127.0.0.1", 1900, GROUP)
    (stop_args, stop_kwargs), (watchdog_args, watchdog_kwargs) = launched
    assert stop_args[1:] == ["-m", "actors.system", "stop", "127.0.0.1", "1900", str(GROUP)]
    assert watchdog_args[1:] == ["-S", "-m", "actors.watchdog", "4242", "127.0.0.1", "1900", str(GROUP)]
    for args, kwargs in launched:
        assert "the-secret" not in " ".join(args)
        assert kwargs["env"]["SLUICE_CLUSTER_SECRET"] == "the-secret"
        assert kwargs["start_new_session"] is True


def test_the_stop_command_does_nothing_when_nothing_of_the_system_is_left(monkeypatch):
    monkeypatch.setattr(system, "_group_members", lambda group: set())

    def no_actor_system(*args):
        raise AssertionError("an ActorSystem(...) here would start a fresh admin on the port")

    monkeypatch.setattr(system, "prepare", no_actor_system)
    monkeypatch.setattr(system, "kill_group", no_actor_system)
    monkeypatch.setenv("SLUICE_CLUSTER_SECRET", "the-secret")
    assert system.stop_from_outside("127.0.0.1", 1900, GROUP) == 0


# --- run.py: the watchdog process only once the admin is gone ------------------------------------


@pytest.fixture
def watchdogs(monkeypatch):
    """start_watchdog recorded (a stand-in process that runs on); the admin found at pid 501."""
    started: list = []

    class Running:
        def poll(self):
            return None

    monkeypatch.setattr(system, "start_watchdog", lambda *args: started.append(args) or Running())
    monkeypatch.setattr(system, "admin_pid", lambda group: 501)
    # No thread on a pidfd of whatever real process has pid 501 (real_admin puts it back).
    monkeypatch.setattr(run._Watchdog, "_watch_admin_exit", lambda self: None)
    return started


def test_no_watchdog_process_while_the_admin_lives_then_one_once_it_is_gone(watchdogs, monkeypatch):
    monkeypatch.setattr(thespian_admin_watch, "installed", lambda: True)
    admin = {"alive": True}
    monkeypatch.setattr(system, "alive", lambda pid, group=None: pid == 501 and group == GROUP and admin["alive"])
    watchdog = run._Watchdog("127.0.0.1", 1900, GROUP)
    assert watchdog.admin == 501
    for _ in range(3):
        watchdog.ensure()
    assert watchdogs == []
    admin["alive"] = False
    watchdog.ensure()
    watchdog.ensure()  # it runs: not started twice
    assert watchdogs == [(os.getpid(), "127.0.0.1", 1900, GROUP)]
    watchdog.proc = None  # it died: the keeper's next turn starts another
    watchdog.ensure()
    assert len(watchdogs) == 2


def test_without_the_patch_the_watchdog_process_runs_from_the_start(watchdogs, monkeypatch):
    monkeypatch.setattr(thespian_admin_watch, "installed", lambda: False)
    monkeypatch.setattr(system, "alive", lambda pid, group=None: True)
    watchdog = run._Watchdog("127.0.0.1", 1900, GROUP)
    assert watchdog.admin is None
    watchdog.ensure()
    assert watchdogs == [(os.getpid(), "127.0.0.1", 1900, GROUP)]


def test_no_group_no_watchdog(watchdogs, monkeypatch):
    monkeypatch.setattr(thespian_admin_watch, "installed", lambda: True)
    watchdog = run._Watchdog("127.0.0.1", 1900, None)
    watchdog.ensure()
    assert watchdog.admin is None and watchdogs == []


@pytest.fixture
def real_admin(watchdogs, monkeypatch):
    """A child process stands in for the admin: its exit wakes run.py's admin-exit thread."""
    monkeypatch.setattr(thespian_admin_watch, "installed", lambda: True)
    real_alive = system.alive
    monkeypatch.setattr(system, "alive", lambda pid, group=None: real_alive(pid))  # it is not in GROUP
    admin = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(system, "admin_pid", lambda group: admin.pid)
    monkeypatch.setattr(run._Watchdog, "_watch_admin_exit", WATCH_ADMIN_EXIT)
    yield admin
    admin.kill()
    admin.wait()


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfd: the keeper's turn alone notices")
def test_the_admins_exit_starts_the_watchdog_process_at_once_without_a_keeper_turn(real_admin, watchdogs):
    """run.py and the admin killed within one keeper turn left the actors running."""
    watchdog = run._Watchdog("127.0.0.1", 1900, GROUP)
    assert watchdog.admin == real_admin.pid and watchdogs == []
    real_admin.kill()  # nobody calls ensure(): only the thread woken by the exit can start it
    deadline = time.monotonic() + 30
    while not watchdogs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watchdogs == [(os.getpid(), "127.0.0.1", 1900, GROUP)]


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfd: the keeper's turn alone notices")
def test_the_admins_exit_after_run_py_began_stopping_starts_nothing(real_admin, watchdogs):
    watchdog = run._Watchdog("127.0.0.1", 1900, GROUP)
    watchdog.stop()  # run.py stops the system next: the admin's exit is expected
    real_admin.kill()
    real_admin.wait()
    threads = [t for t in threading.enumerate() if t.name == "admin-exit"]
    for thread in threads:
        thread.join(30)
    assert not any(t.is_alive() for t in threads) and watchdogs == []
