"""The HTTP server and what its signals mean: SIGTERM drains, SIGINT stops now.

SIGTERM (what an orchestrator sends): /readyz answers 503 and new requests get 503
`draining` from that instant; the listener keeps accepting (a load balancer's health
check must still get its 503), open streams run to their end for up to SLUICE_DRAIN_S;
then whatever is still open gets a terminal `shutting_down` error event, and only then
does uvicorn shut down (stop listening, wait for the connections, lifespan shutdown).
SIGINT (Ctrl-C), or a second signal during a drain: open streams get the terminal event
at once and uvicorn shuts down; a second SIGINT after that forces uvicorn out.

uvicorn's own handling would stop at the first signal, and re-raise it once serving is
over: a re-raised SIGTERM kills the process before run.py stops the actor system. So the
signals are ours (`capture_signals`), and run.py's return decides the exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn

log = logging.getLogger("sluice.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, edge, drain_s: float):
        super().__init__(config)
        self.edge, self.drain_s = edge, drain_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_task: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        """A signal handler: only flags and loop callbacks, nothing that awaits."""
        if sig == signal.SIGTERM and self.started and not self.edge.stopping and not self.should_exit:
            self.edge.begin_stopping()  # /readyz is 503 from this instruction on
            self.loop.call_soon_threadsafe(self._start_drain)
            return
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._stop_now)
        else:
            self.edge.begin_shutdown()

    def _start_drain(self) -> None:
        if not self.should_exit:
            self.drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        log.info("SIGTERM: draining %d open streams for up to %gs", self.edge.open_streams(), self.drain_s)
        if await self.edge.drained(self.drain_s):
            log.info("drained: no stream left open")
        else:
            log.warning("drain deadline: %d streams still open get a shutting_down error", self.edge.open_streams())
        self.edge.begin_shutdown()
        self.should_exit = True

    def _stop_now(self) -> None:
        if self.drain_task is not None:
            self.drain_task.cancel()
        self.edge.begin_shutdown()
