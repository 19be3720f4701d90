"""The edge's way into the actor system, without ever blocking the event loop.

`ActorSystem()` is a per-process singleton and not thread-safe (threads sharing one
context get each other's replies), and `ask` blocks. So every call runs on a small pool
of worker threads, each with its own `asys.private()` context, awaited from the loop with
`run_in_executor`. A worker whose ask timed out drops its context and opens a fresh one,
so a late reply can never be taken for the answer to the next question.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from thespian.actors import ActorSystem

from actors import addressing
from actors.supervisor import SUPERVISOR_NAME, SupervisorActor
from protocols import messages as m

DIRECTORY_TTL_S = 1.0


class BridgeError(Exception):
    """An actor did not answer (code "unavailable"), answered with an ErrorReply (its
    code, e.g. "thread_not_found"), or the message could not be encoded (code
    "unencodable": nothing was sent)."""

    def __init__(self, message: str, code: str = "unavailable"):
        super().__init__(message)
        self.code = code


class ActorBridge:
    def __init__(self, actor_port: int, workers: int = 16):
        self.actor_port = actor_port
        self._local = threading.local()
        self._contexts: list = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="actor-bridge")
        self._asys: ActorSystem | None = None
        self.directory: m.Directory | None = None
        self._directory_at = 0.0
        self._supervisor = None

    def start(self) -> None:
        """Join the running actor system (blocking; call before serving). The process must
        have called `actors.system.prepare` first: unsigned frames would be refused."""
        from actors import transport_auth

        if not transport_auth.installed():
            raise RuntimeError("ActorBridge.start before actors.system.prepare(host, secret): frames would be unsigned")
        self._asys = ActorSystem("multiprocTCPBase", capabilities={"Admin Port": self.actor_port}, logDefs=None)
        self._supervisor = self._asys.createActor(SupervisorActor, globalName=SUPERVISOR_NAME)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for manager in self._contexts:
                try:
                    manager.__exit__(None, None, None)
                except Exception:
                    pass
            self._contexts.clear()

    # --- async API for the loop ----------------------------------------------------------
    async def ask(self, to: str, msg, timeout: float = 5.0):
        """Send `msg` to role or address `to`; return the decoded reply: one of the types
        `messages.REPLIES` lists for the question (anything else arriving meanwhile is a
        stray answer to an earlier tell and is dropped)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.ask_blocking, to, msg, timeout)

    async def tell(self, to: str, msg) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.tell_blocking, to, msg)

    async def refresh_directory(self, force: bool = False) -> m.Directory:
        if force or self.directory is None or time.monotonic() - self._directory_at > DIRECTORY_TTL_S:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self.refresh_directory_blocking)
        return self.directory

    # --- blocking side, on worker threads -----------------------------------------------
    def refresh_directory_blocking(self) -> m.Directory:
        reply = self._ask_address(self._supervisor, m.GetDirectory(), 5.0)
        if not isinstance(reply, m.Directory):
            raise BridgeError(f"supervisor answered {type(reply).__name__}")
        self.directory, self._directory_at = reply, time.monotonic()
        return reply

    def ask_blocking(self, to: str, msg, timeout: float):
        return self._ask_address(self._resolve(to), msg, timeout)

    def tell_blocking(self, to: str, msg) -> None:
        self._context().tell(self._resolve(to), _encoded(msg))

    def _resolve(self, to: str):
        if to == "supervisor":
            return self._supervisor
        if self.directory is None:
            self.refresh_directory_blocking()
        address = self.directory.entries.get(to)
        if address is None:
            raise BridgeError(f"no actor plays {to!r}")
        return addressing.from_string(address)

    def _ask_address(self, address, msg, timeout: float):
        expect = m.REPLIES.get(type(msg), ())
        context = self._context()
        deadline = time.monotonic() + timeout
        reply = context.ask(address, _encoded(msg), timeout)
        while True:
            if reply is None:
                self._drop_context()
                raise BridgeError(f"no answer to {type(msg).__name__} within {timeout:g} s")
            decoded = m.decode(reply) if isinstance(reply, (bytes, bytearray)) else m.Invalid(f"non-bytes reply {type(reply).__name__}")
            if isinstance(decoded, m.Invalid):
                raise BridgeError(f"undecodable reply: {decoded.reason}")
            if isinstance(decoded, m.ErrorReply):
                raise BridgeError(decoded.message, decoded.code)
            if not expect or isinstance(decoded, expect):
                return decoded
            reply = context.listen(max(0.0, deadline - time.monotonic()))

    def _context(self):
        context = getattr(self._local, "context", None)
        if context is None:
            manager = self._asys.private()
            context = manager.__enter__()
            self._local.context, self._local.manager = context, manager
            with self._lock:
                self._contexts.append(manager)
        return context

    def _drop_context(self) -> None:
        manager = getattr(self._local, "manager", None)
        self._local.context = self._local.manager = None
        if manager is not None:
            with self._lock:
                if manager in self._contexts:
                    self._contexts.remove(manager)
            try:
                manager.__exit__(None, None, None)
            except Exception:
                pass


def _encoded(msg) -> bytes:
    """msgpack bytes, or BridgeError("unencodable"): an encoding failure is an answer the
    caller handles like any other, never an exception that kills its task. (The edge
    validates bodies first, edge/body_limits.py; this is the layer behind it.)"""
    try:
        return m.encode(msg)
    except (TypeError, ValueError, OverflowError) as exc:  # msgpack's: int range, nesting, unknown type
        raise BridgeError(f"{type(msg).__name__} cannot be encoded: {exc}", code="unencodable") from None
