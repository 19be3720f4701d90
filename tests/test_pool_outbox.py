"""The Pool's outbox: effects put on the loop thread always reach the actor thread,
however the two threads interleave (a lost wake-up would strand every later effect:
leases never released, streams never finished)."""

from __future__ import annotations

import select
import threading

import pytest

from actors.pool import Outbox

pytestmark = pytest.mark.unit


def test_every_effect_is_drained_under_contention():
    outbox, total = Outbox(), 20_000
    got: list[int] = []
    done = threading.Event()

    def producer():
        for i in range(total):
            outbox.put(i)
        done.set()

    def actor():  # what Thespian does with ThespianWatch: wait for the fd, then drain
        while len(got) < total:
            readable, _, _ = select.select([outbox.wake_r], [], [], 5.0)
            if not readable:
                return  # a wake-up was lost: the test fails below
            got.extend(outbox.drain())

    threads = [threading.Thread(target=producer), threading.Thread(target=actor)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    outbox.close()
    assert done.is_set() and got == list(range(total))


def test_a_put_racing_the_drain_still_wakes_the_actor():
    """The interleaving that once stranded every later effect, made deterministic: the
    loop thread puts "b" while the actor thread is inside drain(), then puts "c"."""
    outbox = Outbox()
    outbox.put("a")
    wake = outbox.wake_r

    class RacingSocket:
        raced = False

        def recv(self, size):
            if not self.raced:
                self.raced = True
                outbox.put("b")  # the other thread, right inside the drain
            return wake.recv(size)

    outbox.wake_r = RacingSocket()
    first = outbox.drain()
    outbox.wake_r = wake
    outbox.put("c")
    readable, _, _ = select.select([wake], [], [], 1.0)
    assert readable, "the put of 'c' did not wake the actor"
    assert first + outbox.drain() == ["a", "b", "c"]
    outbox.close()
