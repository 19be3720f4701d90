"""Thespian's transport loop polls instead of building an epoll per turn
(patches/thespian_selector.py), only Thespian's view of `selectors` changes, and binding
Thespian's sockets no longer installs it as a side effect. The lean poll selector answers
as PollSelector does for everything the transport asks of it."""

from __future__ import annotations

import selectors
import socket

import pytest
from thespian.system.transport import TCPTransport

from patches import thespian_bind, thespian_selector

pytestmark = pytest.mark.unit


def test_the_selector_patch_gives_thespian_a_poll_selector_and_leaves_everyone_else_alone(monkeypatch):
    monkeypatch.setattr(TCPTransport, "selectors", selectors)  # as Thespian has it; put back after
    thespian_bind.install("127.0.0.1")
    assert TCPTransport.selectors is selectors, "binding installed the selector as a side effect"

    assert thespian_selector.install()
    assert thespian_selector.installed()
    assert TCPTransport.selectors.DefaultSelector is thespian_selector.LeanPollSelector
    assert TCPTransport.selectors.EVENT_READ == selectors.EVENT_READ
    if hasattr(selectors, "EpollSelector"):
        assert selectors.DefaultSelector is selectors.EpollSelector  # asyncio's default is untouched


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def ready(selector_class, registrations, timeout):
    """What a selector of this class reports, as (fd, events) pairs with the key's fields."""
    selector = selector_class()
    try:
        for obj, events in registrations:
            selector.register(obj, events)
        return sorted((key.fd, key.events, key.fileobj, events) for key, events in selector.select(timeout))
    finally:
        selector.close()


@pytest.mark.parametrize(
    "case",
    ["idle", "readable", "writable", "both ways", "hung up", "socket objects"],
)
def test_the_lean_selector_reports_what_poll_selector_reports(pair, case):
    a, b = pair
    rw = selectors.EVENT_READ | selectors.EVENT_WRITE
    registrations = {
        "idle": [(a.fileno(), selectors.EVENT_READ), (b.fileno(), selectors.EVENT_READ)],
        "readable": [(a.fileno(), selectors.EVENT_READ), (b.fileno(), selectors.EVENT_READ)],
        "writable": [(a.fileno(), selectors.EVENT_WRITE), (b.fileno(), selectors.EVENT_READ)],
        "both ways": [(a.fileno(), rw), (b.fileno(), rw)],
        "hung up": [(a.fileno(), selectors.EVENT_READ), (b.fileno(), selectors.EVENT_WRITE)],
        "socket objects": [(a, selectors.EVENT_READ), (b, selectors.EVENT_WRITE)],
    }[case]
    if case in ("readable", "both ways", "socket objects"):
        b.send(b"x")
    if case == "hung up":
        b.shutdown(socket.SHUT_RDWR)
    timeout = 0.01 if case == "idle" else 1
    lean = ready(thespian_selector.LeanPollSelector, registrations, timeout)
    assert lean == ready(selectors.PollSelector, registrations, timeout)
    assert bool(lean) is (case != "idle")


def test_the_lean_selector_refuses_what_poll_selector_refuses(pair):
    a, _ = pair
    for selector_class in (thespian_selector.LeanPollSelector, selectors.PollSelector):
        selector = selector_class()
        with pytest.raises(ValueError):  # Thespian's loop looks for the bad descriptor on ValueError
            selector.register(-1, selectors.EVENT_READ)
        with pytest.raises(ValueError):
            selector.register(a.fileno(), 0)
        selector.register(a.fileno(), selectors.EVENT_READ)
        with pytest.raises(KeyError):
            selector.register(a.fileno(), selectors.EVENT_WRITE)
        selector.close()


def test_the_lean_selector_waits_at_least_the_timeout():
    import time

    selector = thespian_selector.LeanPollSelector()
    a, b = socket.socketpair()
    try:
        selector.register(a.fileno(), selectors.EVENT_READ)
        started = time.monotonic()
        assert selector.select(0.0004) == []  # rounded up to poll()'s 1 ms, never down to 0
        assert time.monotonic() - started >= 0.0009
        assert selector.select(0) == [] and selector.select(-1) == []  # does not block
    finally:
        selector.close()
        a.close()
        b.close()
