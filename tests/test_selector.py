"""Thespian's transport loop polls instead of building an epoll per turn (actors/selector.py),
and only Thespian's view of `selectors` changes."""
from __future__ import annotations

import selectors

import pytest
from thespian.system.transport import TCPTransport

from actors import addressing

pytestmark = pytest.mark.unit


def test_bind_to_gives_thespian_a_poll_selector_and_leaves_everyone_else_alone():
    addressing.bind_to("127.0.0.1")
    assert TCPTransport.selectors.DefaultSelector is selectors.PollSelector
    assert TCPTransport.selectors.EVENT_READ == selectors.EVENT_READ
    if hasattr(selectors, "EpollSelector"):
        assert selectors.DefaultSelector is selectors.EpollSelector  # asyncio's default is untouched
