"""httpcore's async locks without a trip through the event loop when nobody holds them (an
optimisation applied to httpcore in the Pool).

Every httpcore async lock is an `anyio.Lock()`, and anyio's `acquire()` is a checkpoint
even when the lock is free: it yields to the event loop once (a `sleep(0)` inside a shielded
cancel scope) before it returns. httpcore's HTTP/2 connection takes such a lock two to
three times per DATA frame it reads: the read lock around each socket read, and the write
lock after each read and after each frame it acknowledges (to send a WINDOW_UPDATE that is
almost always empty). So every token of every stream costs the Pool's loop a few extra
turns, each a task switch. anyio 4.5 added `Lock(fast_acquire=True)`: a free lock is taken
without yielding; a held one is waited for exactly as before (FIFO), and the code under the
lock still reaches the loop at its next real await (httpcore only awaits socket I/O there,
and anyio's socket reads and sends are checkpoints themselves), so nothing starves and a
cancellation still lands at the next read. Measured on the Pool's read path alone
(`run_call` + the OpenAI adapter + the hub's encoding, 20 streams of 64 tokens 20 ms apart
against bench.fake_upstream over h2c): ~145 → ~108 µs CPU per token (four alternating
pairs). No upstream issue.

Installed by `patches.install_httpcore()` in the Pool process, before its first upstream
connection (a lock already used before it keeps anyio's default one). Written for httpcore 1.0.x
(`httpcore._synchronization.AsyncLock` creating its anyio lock in `setup()`) and anyio 4.5+;
on anything else it logs a warning and leaves httpcore as it is.
"""

from __future__ import annotations

import inspect

import anyio
from httpcore import _synchronization

from patches import versions

LIBRARY, WRITTEN_FOR = "httpcore", "1.0."

_original_setup = _synchronization.AsyncLock.setup


def setup(self) -> None:
    """Replacement for `AsyncLock.setup`: the same lock, taken without a yield when free."""
    _original_setup(self)
    if self._backend == "asyncio":
        self._anyio_lock = anyio.Lock(fast_acquire=True)


def install() -> bool:
    """Patch httpcore's async lock; False (httpcore unchanged, one warning) if httpcore or
    anyio is not the shape this was written against. Idempotent."""
    if "fast_acquire" not in inspect.signature(anyio.Lock).parameters:
        return versions.fallback(__name__, "this anyio has no Lock(fast_acquire=...) (4.5+); locks keep their yield")
    return versions.guarded_install(
        __name__,
        LIBRARY,
        WRITTEN_FOR,
        _synchronization.AsyncLock,
        "setup",
        setup,
        needs=("setup",),
        shape="httpcore's AsyncLock",
        without="every lock keeps its event-loop yield",
    )


def installed() -> bool:
    return _synchronization.AsyncLock.setup is setup
