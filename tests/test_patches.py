"""The fenced patches (patches/): each refuses a library version it was not written for —
loudly where it guards security or cost, with a warning and the library untouched where
it is an optimisation — installs idempotently, and `patches.installed()` says what is in.

Every test puts back the library state it changes (monkeypatch), so the rest of this
pytest process sees Thespian and httpcore as they were."""

from __future__ import annotations

import asyncio
import importlib.machinery
import io
import json
import logging
import os
import pickle
import selectors
import subprocess
import sys
import types
from datetime import timedelta

import pytest
from httpcore import _synchronization
from httpcore._async import http2
from thespian.system import multiprocCommon
from thespian.system.actorManager import ActorManager
from thespian.system.admin import convention
from thespian.system.admin.convention import ConventioneerAdmin
from thespian.system.transport import IPBase, TCPTransport, streamBuffer

import patches
from patches import (
    httpcore_fast_locks,
    httpcore_h2_empty_writes,
    httpcore_h2_expiry,
    httpcore_h2_one_write,
    httpcore_h2_reads,
    httpcore_rst_stream,
    thespian_admin_logs,
    thespian_admin_watch,
    thespian_bind,
    thespian_child_exit,
    thespian_convention,
    thespian_forwarding,
    thespian_proctitle,
    thespian_selector,
    thespian_transport,
    thespian_turns,
    versions,
)
from tests.support import ROOT
from tests.test_thespian_turns import TURNS  # what patches/thespian_turns.py replaces

pytestmark = pytest.mark.unit

SECRET = b"patches-test-secret-0123456789abcdef"
# Thespian's own Convention timers (7 min 22 s, 3 min 22 s, 3 misses), unless a test before us tuned them.
THESPIAN_TIMERS = {
    "CONVENTION_REREGISTRATION_PERIOD": timedelta(minutes=7, seconds=22),
    "CONVENTION_RESTART_PERIOD": timedelta(minutes=3, seconds=22),
    "CONVENTION_REGISTRATION_MISS_MAX": 3,
}
# What patches/thespian_admin_logs.py replaces.
ADMIN_LOGS = [
    (multiprocCommon, "_startLogger"),
    (multiprocCommon.MultiProcReplicator, "_handleReplicatorMessages"),
    (multiprocCommon.MultiProcReplicator, "_cleanupAdmin"),
]


@pytest.fixture
def pristine(monkeypatch):
    """Thespian and httpcore as they are without our patches; everything put back after."""
    monkeypatch.setattr(TCPTransport, "serializer", pickle)
    for module in (TCPTransport, streamBuffer):
        for name in ("ackMsg", "ackDataErrMsg"):
            monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(TCPTransport, "selectors", selectors)
    for name, value in THESPIAN_TIMERS.items():
        monkeypatch.setattr(convention, name, value)
    if thespian_forwarding.installed():
        monkeypatch.setattr(ConventioneerAdmin, "_not_compatible", thespian_forwarding._original)
    monkeypatch.setattr(thespian_forwarding, "_original", thespian_forwarding._original)
    monkeypatch.setattr(ActorManager, "_childInaccessible", ActorManager._childInaccessible)  # put back after
    if thespian_child_exit.installed():
        monkeypatch.setattr(ActorManager, "_childInaccessible", thespian_child_exit._original)
    monkeypatch.setattr(thespian_child_exit, "_original", thespian_child_exit._original)
    for owner, name in TURNS:  # Thespian's own while the test runs, whatever was in before, put back after
        monkeypatch.setattr(owner, name, thespian_turns._originals.get((owner, name), owner.__dict__[name]))
    for name in ("_originals", "_identities"):
        monkeypatch.setattr(thespian_turns, name, {})
    for name in ("_xmit_2", "_xmit_4", "_readable", "_now"):
        monkeypatch.setattr(thespian_turns, name, None)
    monkeypatch.setattr(IPBase.IPActorAddress, "__init__", IPBase.IPActorAddress.__init__)
    if thespian_bind.installed():  # a test before us bound this process: start from Thespian's own
        monkeypatch.setattr(IPBase.IPActorAddress, "__init__", thespian_bind._original_init)
    monkeypatch.setattr(thespian_bind, "_bind_host", None)
    monkeypatch.setattr(thespian_bind, "_original_init", thespian_bind._original_init)
    monkeypatch.setenv("THESPIAN_BASE_IPADDR", os.environ.get("THESPIAN_BASE_IPADDR", "127.0.0.1"))
    monkeypatch.delitem(sys.modules, thespian_proctitle.OPTIONAL, raising=False)  # the recorded miss, put back after
    for owner, name in ADMIN_LOGS:  # Thespian's own while the test runs, whatever was in before, put back after
        monkeypatch.setattr(owner, name, thespian_admin_logs._originals.get(name, owner.__dict__[name]))
    monkeypatch.setattr(thespian_admin_logs, "_originals", {})
    monkeypatch.setattr(multiprocCommon, "startAdmin", thespian_admin_watch._original or multiprocCommon.startAdmin)
    monkeypatch.setattr(thespian_admin_watch, "_original", None)

    async def unpatched_receive(self, request, stream_id):  # stands for httpcore's own
        raise AssertionError("not called here")

    monkeypatch.setattr(http2.AsyncHTTP2Connection, "_receive_stream_event", unpatched_receive)
    monkeypatch.setattr(http2.AsyncHTTP2Connection, "has_expired", httpcore_h2_expiry._original_has_expired)
    monkeypatch.setattr(
        http2.AsyncHTTP2Connection, "handle_async_request", httpcore_h2_expiry._original_handle_async_request
    )
    monkeypatch.setattr(httpcore_rst_stream, "_checked", False)
    monkeypatch.setattr(http2.AsyncHTTP2Connection, "_response_closed", httpcore_rst_stream._original_response_closed)
    monkeypatch.setattr(_synchronization.AsyncLock, "setup", httpcore_fast_locks._original_setup)
    for name in ("_send_request_headers", "_send_request_body"):
        monkeypatch.setattr(http2.AsyncHTTP2Connection, name, getattr(httpcore_h2_one_write, f"_original{name}"))
    monkeypatch.setattr(
        http2.AsyncHTTP2Connection, "_write_outgoing_data", httpcore_h2_empty_writes._original_write_outgoing_data
    )
    assert patches.installed() == []


def untested(monkeypatch, library: str, version: str) -> None:
    real = versions.metadata.version
    monkeypatch.setattr("importlib.metadata.version", lambda name: version if name == library else real(name))


def test_install_thespian_installs_its_patches_once(pristine):
    patches.install_thespian("127.0.0.1", SECRET)
    assert patches.installed() == list(patches.THESPIAN)  # every one, in its order
    forwarding, child_exit = ConventioneerAdmin._not_compatible, ActorManager._childInaccessible
    turns = (TCPTransport.TCPTransport._next_XMIT_2, TCPTransport.TCPTransport._handleReadableIncoming)
    serializer, view, init = TCPTransport.serializer, TCPTransport.selectors, IPBase.IPActorAddress.__init__
    start_logger = multiprocCommon._startLogger
    patches.install_thespian("127.0.0.1", SECRET)  # idempotent: nothing is wrapped twice
    assert multiprocCommon._startLogger is start_logger is thespian_admin_logs._start_logging_here
    assert multiprocCommon.startAdmin is thespian_admin_watch._start_admin
    assert ConventioneerAdmin._not_compatible is forwarding and ActorManager._childInaccessible is child_exit
    assert (TCPTransport.TCPTransport._next_XMIT_2, TCPTransport.TCPTransport._handleReadableIncoming) == turns
    assert (TCPTransport.serializer, TCPTransport.selectors, IPBase.IPActorAddress.__init__) == (serializer, view, init)
    address = IPBase.TCPv4ActorAddress(None, 0)  # what the transport makes for a listening socket
    assert address.bindname[0] == "127.0.0.1" and os.environ["THESPIAN_BASE_IPADDR"] == "127.0.0.1"
    # A silently dead Convention member is noticed in seconds, not after 3 x 7 min 22 s.
    assert convention.CONVENTION_REREGISTRATION_PERIOD * convention.CONVENTION_REGISTRATION_MISS_MAX <= timedelta(
        seconds=5
    )
    assert convention.CONVENTION_RESTART_PERIOD == convention.CONVENTION_REREGISTRATION_PERIOD


def test_install_httpcore_installs_its_six_patches_once(pristine):
    everything = [
        "httpcore_h2_reads",
        "httpcore_h2_expiry",
        "httpcore_rst_stream",
        "httpcore_fast_locks",
        "httpcore_h2_one_write",
        "httpcore_h2_empty_writes",
    ]
    patches.install_httpcore()
    assert patches.installed() == everything
    patches.install_httpcore()
    assert http2.AsyncHTTP2Connection._receive_stream_event is httpcore_h2_reads.receive_stream_event
    assert http2.AsyncHTTP2Connection.has_expired is httpcore_h2_expiry.has_expired
    assert http2.AsyncHTTP2Connection.handle_async_request is httpcore_h2_expiry.handle_async_request
    assert _synchronization.AsyncLock.setup is httpcore_fast_locks.setup
    assert http2.AsyncHTTP2Connection._send_request_body is httpcore_h2_one_write.send_request_body
    assert http2.AsyncHTTP2Connection._write_outgoing_data is httpcore_h2_empty_writes.write_outgoing_data
    assert patches.installed() == everything


@pytest.mark.parametrize(
    "patch, install",
    [
        (thespian_transport, lambda: thespian_transport.install(SECRET)),
        (thespian_bind, lambda: thespian_bind.install("127.0.0.1")),
        (httpcore_rst_stream, httpcore_rst_stream.install),
    ],
    ids=lambda p: getattr(p, "__name__", ""),
)
def test_a_security_or_cost_patch_refuses_an_untested_version_loudly(pristine, monkeypatch, patch, install):
    untested(monkeypatch, patch.LIBRARY, "9.9.0")
    with pytest.raises(versions.UntestedVersion) as refused:
        install()
    message = str(refused.value)
    assert patch.__name__ in message
    assert (
        f"written for {patch.LIBRARY} {patch.WRITTEN_FOR}x" in message
        and "this is " + patch.LIBRARY + " 9.9.0" in message
    )
    assert not patch.installed() and patches.installed() == []


@pytest.mark.parametrize(
    "patch",
    [
        thespian_selector,
        thespian_convention,
        thespian_forwarding,
        thespian_child_exit,
        thespian_turns,
        thespian_proctitle,
        thespian_admin_logs,
        thespian_admin_watch,
        httpcore_h2_reads,
        httpcore_h2_expiry,
        httpcore_fast_locks,
        httpcore_h2_one_write,
        httpcore_h2_empty_writes,
    ],
    ids=lambda p: p.__name__,
)
def test_an_optimisation_falls_back_with_a_warning_on_an_untested_version(pristine, monkeypatch, caplog, patch):
    untested(monkeypatch, patch.LIBRARY, "9.9.0")
    before = (
        TCPTransport.selectors,
        http2.AsyncHTTP2Connection._receive_stream_event,
        http2.AsyncHTTP2Connection.has_expired,
        convention.CONVENTION_REREGISTRATION_PERIOD,
        ConventioneerAdmin._not_compatible,
        ActorManager._childInaccessible,
        _synchronization.AsyncLock.setup,
        TCPTransport.TCPTransport._handleReadableIncoming,
        multiprocCommon._startLogger,
        multiprocCommon.startAdmin,
        http2.AsyncHTTP2Connection._send_request_headers,
        http2.AsyncHTTP2Connection._send_request_body,
        http2.AsyncHTTP2Connection._write_outgoing_data,
    )
    with caplog.at_level(logging.WARNING, logger="sluice.patches"):
        assert patch.install() is False
    assert (
        TCPTransport.selectors,
        http2.AsyncHTTP2Connection._receive_stream_event,
        http2.AsyncHTTP2Connection.has_expired,
        convention.CONVENTION_REREGISTRATION_PERIOD,
        ConventioneerAdmin._not_compatible,
        ActorManager._childInaccessible,
        _synchronization.AsyncLock.setup,
        TCPTransport.TCPTransport._handleReadableIncoming,
        multiprocCommon._startLogger,
        multiprocCommon.startAdmin,
        http2.AsyncHTTP2Connection._send_request_headers,
        http2.AsyncHTTP2Connection._send_request_body,
        http2.AsyncHTTP2Connection._write_outgoing_data,
    ) == before, "the library was changed anyway"
    assert not patch.installed() and patches.installed() == []
    (record,) = caplog.records
    assert patch.__name__ in record.getMessage() and "9.9.0" in record.getMessage()


def test_an_optimisation_falls_back_on_a_connection_of_another_shape(pristine, monkeypatch, caplog):
    patch = httpcore_h2_reads
    monkeypatch.delattr(http2.AsyncHTTP2Connection, "_receive_response_body")
    before = (http2.AsyncHTTP2Connection._receive_stream_event, http2.AsyncHTTP2Connection.has_expired)
    with caplog.at_level(logging.WARNING, logger="sluice.patches"):
        assert patch.install() is False
    assert (http2.AsyncHTTP2Connection._receive_stream_event, http2.AsyncHTTP2Connection.has_expired) == before
    assert not patch.installed()
    (record,) = caplog.records
    assert "httpcore's HTTP/2 connection is not the expected shape" in record.getMessage()


def test_the_installed_library_versions_are_the_ones_the_patches_were_written_for():
    """pyproject.toml pins them; a venv that resolved something else fails here first."""
    for patch in (
        thespian_transport,
        thespian_bind,
        thespian_selector,
        thespian_convention,
        thespian_forwarding,
        thespian_child_exit,
        thespian_turns,
        thespian_proctitle,
        thespian_admin_logs,
        thespian_admin_watch,
        httpcore_h2_reads,
        httpcore_h2_expiry,
        httpcore_rst_stream,
        httpcore_fast_locks,
        httpcore_h2_one_write,
        httpcore_h2_empty_writes,
    ):
        versions.check(patch.__name__, patch.LIBRARY, patch.WRITTEN_FOR)
    versions.check(
        httpcore_h2_empty_writes.__name__, httpcore_h2_empty_writes.H2_LIBRARY, httpcore_h2_empty_writes.H2_WRITTEN_FOR
    )


class RecordingFinder:
    """A meta path finder that only notes which modules the import system searched for."""

    def __init__(self):
        self.asked: list[str] = []

    def find_spec(self, name, path=None, target=None):
        self.asked.append(name)
        return None


def test_thespian_names_its_processes_without_searching_for_setproctitle_each_time(pristine, monkeypatch):
    """thespian_proctitle: Thespian's setProcName (in the admin, the logger and every actor)
    finds the miss recorded, instead of walking sys.path for a library that is not there."""
    from thespian.system.utilis import setProcName

    finder = RecordingFinder()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    setProcName("Actor", "address")  # Thespian's own: a search every time
    assert finder.asked == ["setproctitle"]
    assert thespian_proctitle.install() is True and thespian_proctitle.installed()
    assert thespian_proctitle.install() is True  # idempotent
    finder.asked.clear()
    setProcName("Actor", "address")  # goes on as without the library, with no search
    assert finder.asked == []
    with pytest.raises(ImportError):
        import setproctitle  # noqa: F401
    assert "thespian_proctitle" in patches.installed()
    thespian_proctitle.uninstall()
    assert "setproctitle" not in sys.modules


def test_setproctitle_is_used_where_it_is_installed(pristine, monkeypatch):
    """Nothing is recorded where the library can be found: Thespian names processes with it."""
    found = importlib.machinery.ModuleSpec("setproctitle", None)
    monkeypatch.setattr(thespian_proctitle.importlib.util, "find_spec", lambda name: found)
    assert thespian_proctitle.install() is True
    assert "setproctitle" not in sys.modules and not thespian_proctitle.installed()


def test_the_admin_logs_patch_leaves_a_thespian_of_another_shape_alone(pristine, monkeypatch, caplog):
    monkeypatch.delattr(multiprocCommon.MultiProcReplicator, "_cleanupAdmin")
    with caplog.at_level(logging.WARNING, logger="sluice.patches"):
        assert thespian_admin_logs.install() is False
    assert not thespian_admin_logs.installed() and thespian_admin_logs._originals == {}
    (record,) = caplog.records
    assert "multiprocCommon is not the expected shape" in record.getMessage()


def test_the_admin_watch_patch_leaves_a_thespian_of_another_shape_alone(pristine, monkeypatch, caplog):
    monkeypatch.delattr(multiprocCommon, "startAdmin")
    with caplog.at_level(logging.WARNING, logger="sluice.patches"):
        assert thespian_admin_watch.install() is False
    assert not thespian_admin_watch.installed() and thespian_admin_watch._original is None
    (record,) = caplog.records
    assert "not the expected shape" in record.getMessage() and "watchdog process stays" in record.getMessage()


def test_the_admin_watch_patch_wraps_startAdmin_once_and_uninstalls(pristine):
    original = multiprocCommon.startAdmin
    assert thespian_admin_watch.install() is True and thespian_admin_watch.install() is True
    assert multiprocCommon.startAdmin is thespian_admin_watch._start_admin
    assert thespian_admin_watch._original is original  # not the wrapper wrapping itself
    thespian_admin_watch.uninstall()
    assert multiprocCommon.startAdmin is original and not thespian_admin_watch.installed()


def test_the_admin_writes_a_record_with_the_log_defs_handler_and_passes_warnings_to_the_leader():
    """thespian_admin_logs.AdminLogs: what the logger process did with each record it got,
    in a logging hierarchy of its own (this process's logging is left as it was)."""
    stream = io.StringIO()
    log_defs = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"sluice": {"()": "protocols.logfmt.JsonFormatter"}},
        "handlers": {"out": {"class": "logging.StreamHandler", "stream": stream, "formatter": "sluice"}},
        "root": {"level": "INFO", "handlers": ["out"]},
    }
    root, handlers, manager = logging.root, list(logging.root.handlers), logging.Logger.manager
    logs = thespian_admin_logs.AdminLogs(log_defs, aggregator="the leader's admin")
    assert (logging.root, logging.root.handlers, logging.Logger.manager) == (root, handlers, manager)
    sent = []
    admin = types.SimpleNamespace(_send_intent=sent.append)
    info = logging.LogRecord("sluice.pacer", logging.INFO, __file__, 1, "granted", None, None)
    info.actorAddress = "ActorAddr-(T|:1234)"  # what Thespian's forwarder puts on every record
    warning = logging.LogRecord("sluice.pacer", logging.WARNING, __file__, 1, "circuit open", None, None)
    logs.write(admin, info)
    logs.write(admin, warning)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["level"], line["logger"], line["message"]) for line in lines] == [
        ("INFO", "sluice.pacer", "granted"),
        ("WARNING", "sluice.pacer", "circuit open"),
    ]
    assert lines[0]["actorAddress"] == "ActorAddr-(T|:1234)"
    assert [(intent.targetAddr, intent.message) for intent in sent] == [("the leader's admin", warning)]
    logs.close()
    assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "ActorSystem Logging Shutdown"


def test_a_fast_lock_is_taken_without_a_yield_when_free_and_waited_for_when_held(pristine):
    """httpcore_fast_locks: the loop gets no turn inside a free acquire (anyio's own lock
    yields once there); a held lock still makes the next taker wait, in order."""

    async def yields_while_taking(lock) -> bool:
        turned = []
        asyncio.get_running_loop().call_soon(turned.append, True)
        async with lock:
            return bool(turned)

    async def contended() -> list[str]:
        lock, order = _synchronization.AsyncLock(), []

        async def take(name: str) -> None:
            async with lock:
                order.append(name)
                await asyncio.sleep(0.01)

        await asyncio.gather(take("a"), take("b"), take("c"))
        return order

    assert asyncio.run(yields_while_taking(_synchronization.AsyncLock())) is True  # anyio's own
    assert httpcore_fast_locks.install() is True
    assert asyncio.run(yields_while_taking(_synchronization.AsyncLock())) is False
    assert asyncio.run(contended()) == ["a", "b", "c"]


def test_asking_what_is_installed_imports_no_patched_library():
    code = "import sys, patches; print(patches.installed(), 'httpcore' in sys.modules, 'thespian' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "False", "False"]


class _Exiting(ActorManager):
    """Just enough of an actor's manager to run Thespian's own `_shutdownActor` and
    `_handleChildExited`: what it sends is kept, nothing reaches a socket."""

    def __init__(self, children):
        from thespian.system.utilis import StatsManager

        class Transport:
            myAddress, aborted = "me", False

            def deadAddress(self, manager, address):
                pass

            def abort_run(self, drain=False):
                self.aborted = True

        self.transport, self._children, self._sCBStats = Transport(), list(children), StatsManager()
        self._parentAddr, self._srcNotifyEnabled, self._addrManager, self.sent = "parent", False, None, []

    def _send_intent(self, intent):
        self.sent.append(intent)

    def _childExited(self, child):
        pass


def test_an_actor_whose_child_is_unreachable_exits_once_the_others_have(pristine):
    """thespian_child_exit: the exit request that cannot be delivered (the child's host is
    gone) crosses off that child, not the last one; the actor then exits when the other
    child confirms (Thespian's own callback named the last child: it waited forever)."""
    from thespian.actors import ActorExitRequest, ChildActorExited
    from thespian.system.transport import SendStatus

    assert thespian_child_exit.install()
    actor = _Exiting(["on-the-lost-host", "here"])
    actor._shutdownActor(True)
    requests = {intent.targetAddr: intent for intent in actor.sent if isinstance(intent.message, ActorExitRequest)}
    assert sorted(requests) == ["here", "on-the-lost-host"]
    requests["on-the-lost-host"].tx_done(SendStatus.DeadTarget)
    assert actor.childAddresses == ["here"] and not actor.transport.aborted
    actor._handleChildExited("here")  # its ChildActorExited
    assert actor.childAddresses == [] and actor.transport.aborted
    assert [i.message.childAddress for i in actor.sent if isinstance(i.message, ChildActorExited)] == ["me"]
