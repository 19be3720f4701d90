"""Measurement records from the edge, sent to Metrics in batches (never one per token,
nor one message per request): flushed every `every_s` or when `batch` records wait."""

from __future__ import annotations

import asyncio
import logging

from edge.bridge import ActorBridge
from protocols import messages as m
from protocols import roles

log = logging.getLogger("sluice.edge.records")


class RecordSender:
    def __init__(self, bridge: ActorBridge, source: str, every_s: float = 0.1, batch: int = 256):
        self.bridge, self.source, self.every_s, self.batch = bridge, source, every_s, batch
        self.pending: list[dict] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def add(self, record: dict) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.batch:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.every_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        try:
            await self.bridge.tell(roles.METRICS, m.Records(self.source, batch))
        except Exception as exc:  # metrics are best effort; requests must not fail for them
            log.warning("dropped %d records: %s", len(batch), exc)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()
