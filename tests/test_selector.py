"""Thespian's transport loop polls instead of building an epoll per turn
(patches/thespian_selector.py), only Thespian's view of `selectors` changes, and binding
Thespian's sockets no longer installs it as a side effect."""

from __future__ import annotations

import selectors

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
    assert TCPTransport.selectors.DefaultSelector is selectors.PollSelector
    assert TCPTransport.selectors.EVENT_READ == selectors.EVENT_READ
    if hasattr(selectors, "EpollSelector"):
        assert selectors.DefaultSelector is selectors.EpollSelector  # asyncio's default is untouched
