"""edge/records.py: the batching rule (`RecordBatch`, shared with the simulator's edge) and
its host on the event loop (`RecordSender`), with a stand-in bridge (the actor side)."""

from __future__ import annotations

import asyncio

import pytest

from edge.records import RecordBatch, RecordsDue, RecordSender
from protocols import messages as m
from protocols import roles
from protocols.effects import After, Send

pytestmark = pytest.mark.unit


def test_the_first_record_sets_one_timer_and_the_timer_sends_the_batch():
    batch = RecordBatch("edge:e1", every_s=0.1, size=3)
    [timer] = batch.add({"n": 1})
    assert isinstance(timer, After) and timer.delay_s == 0.1 and isinstance(timer.msg, RecordsDue)
    assert batch.add({"n": 2}) == []  # one timer at a time
    [send] = batch.due()
    assert isinstance(send, Send) and send.to == roles.METRICS
    assert send.msg == m.Records("edge:e1", [{"n": 1}, {"n": 2}])
    assert batch.due() == [] and batch.pending == []
    assert isinstance(batch.add({"n": 3})[0], After)  # the next batch has its own timer


def test_a_full_batch_goes_at_once_and_flush_sends_what_waits():
    batch = RecordBatch("edge:e1", every_s=0.1, size=2)
    batch.add({"n": 1})
    [send] = batch.add({"n": 2})
    assert send.msg.records == [{"n": 1}, {"n": 2}] and batch.pending == []
    assert batch.flush() == []
    batch.add({"n": 3})
    assert batch.flush()[0].msg.records == [{"n": 3}]


class Bridge:
    def __init__(self):
        self.told: list = []
        self.arrived = asyncio.Event()

    async def tell(self, to, msg):
        self.told.append((to, msg))
        self.arrived.set()


def test_the_sender_keeps_records_until_started_then_its_timer_sends_them():
    async def scenario():
        bridge = Bridge()
        sender = RecordSender(bridge, "edge-1", every_s=0.01)
        sender.add({"n": 1})
        assert sender.pending == [{"n": 1}] and bridge.told == []  # not started: no timer
        sender.start()
        await asyncio.wait_for(bridge.arrived.wait(), 5)
        assert bridge.told == [(roles.METRICS, m.Records("edge-1", [{"n": 1}]))] and sender.pending == []
        sender.add({"n": 2})
        await sender.flush()  # a query sees it at once
        assert bridge.told[-1][1].records == [{"n": 2}]
        sender.add({"n": 3})
        await sender.close()  # nothing is lost at the end
        assert bridge.told[-1][1].records == [{"n": 3}] and len(bridge.told) == 3

    asyncio.run(scenario())
