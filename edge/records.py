"""Measurement records from the edge, sent to Metrics in batches (never one per token,
nor one message per request): at most `every_s` after the first record of a batch, or
at once when `batch` records wait.

`RecordBatch` is the plain rule (what waits, when a `Records` message goes), the same in the
simulator's edge (sim/harness.py `SimEdge`); `RecordSender` hosts it on the edge's event
loop (its timer, and the bridge's `tell`)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from protocols import messages as m
from protocols import roles
from protocols.effects import After, Send

if TYPE_CHECKING:  # the simulator imports this module without the actor system
    from edge.bridge import ActorBridge

log = logging.getLogger("sluice.edge.records")


class RecordsDue:
    """The batch's timer (a local message, never on the wire)."""


class RecordBatch:
    """Records waiting for one `Records(source, batch)` message to Metrics.

    `add(record)` -> `[After(every_s, RecordsDue())]` for the first record while no timer
    is set, `[Send(metrics, Records)]` once `size` records wait, else `[]`; `due()` when
    that timer fires, and `flush()` at any time (a query that must see everything so far,
    the end): -> the `Send`, or `[]` when nothing waits."""

    def __init__(self, source: str, every_s: float = 0.1, size: int = 256):
        self.source, self.every_s, self.size = source, every_s, size
        self.pending: list[dict] = []
        self.timer_set = False

    def add(self, record: dict) -> list:
        self.pending.append(record)
        if len(self.pending) >= self.size:
            return self.flush()
        if self.timer_set:
            return []
        self.timer_set = True
        return [After(self.every_s, RecordsDue())]

    def due(self) -> list:
        self.timer_set = False
        return self.flush()

    def flush(self) -> list:
        if not self.pending:
            return []
        batch, self.pending = self.pending, []
        return [Send(roles.METRICS, m.Records(self.source, batch))]


class RecordSender:
    """The edge's host of a `RecordBatch`: the timer is the loop's, the messages go out
    through the bridge from one task, in order. Not started: records wait (no timer)."""

    def __init__(self, bridge: ActorBridge, source: str, every_s: float = 0.1, batch: int = 256):
        self.bridge = bridge
        self.batch = RecordBatch(source, every_s, batch)
        self._outbox: list[Send] = []  # Records messages not told yet
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> list[dict]:
        """Every record not sent yet."""
        return [r for send in self._outbox for r in send.msg.records] + self.batch.pending

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        if self.batch.timer_set:  # records came before the start: their timer starts now
            self._set_timer(self.batch.every_s)

    def add(self, record: dict) -> None:
        self._carry(self.batch.add(record))

    def _carry(self, effects: list) -> None:
        for effect in effects:
            if isinstance(effect, After):
                if self._task is not None:
                    self._set_timer(effect.delay_s)
            else:
                self._outbox.append(effect)
                self._wake.set()

    def _set_timer(self, delay_s: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay_s, lambda: self._carry(self.batch.due()))

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._send()

    async def _send(self) -> None:
        while self._outbox:
            send = self._outbox.pop(0)
            try:
                await self.bridge.tell(send.to, send.msg)
            except Exception as exc:  # metrics are best effort; requests must not fail for them
                log.warning("dropped %d records: %s", len(send.msg.records), exc)

    async def flush(self) -> None:
        """Send everything measured so far now (a query must see it)."""
        self._carry(self.batch.flush())
        await self._send()

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        await self.flush()
