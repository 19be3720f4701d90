"""The edge's way into the actor system, without ever blocking the event loop.

`ActorSystem()` is a per-process singleton and not thread-safe (threads sharing one
context get each other's replies), and `ask` blocks. So every call runs on a small pool
of worker threads, each with its own `asys.private()` context, awaited from the loop with
`run_in_executor`. A worker whose ask timed out drops its context and opens a fresh one,
so a late reply can never be taken for the answer to the next question.

Processes die and are replaced (docs/reliability.md). An ask to a role waits in short
slices and, between them, looks at the directory (refreshed every second by the edge):
when the role's address changed, the actor it asked is dead and the question goes again
to its replacement, so a request is not left waiting the whole timeout on a dead shard. The dead actor may
have answered just before it died, so such a question can get two answers: the first is
taken, and the bridge listens one more slice for the other, which it hands to `on_stray`
(the edge gives back the reference such an `Admitted` holds), then drops the context so
nothing of it reaches a later question. An answer naming another request id is a stray too.
The Supervisor is found by its global name again when it stops answering (run.py's
keeper replaces a dead one). On a member host of a cluster that lookup goes to the
leader (docs/scale-out.md); with the leader gone it blocks until Thespian gives up, so one
thread looks at a time and the others fail at once (the edge answers 503, never hangs).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from thespian.actors import ActorSystem

from actors import addressing
from actors.supervisor import SupervisorActor
from protocols import messages as m
from protocols import roles, trace
from protocols.roles import SUPERVISOR_NAME

DIRECTORY_TTL_S = 1.0
DIRECTORY_ASK_S = 2.0
FOLLOW_SLICE_S = 0.25  # how often an ask to a role looks whether the role moved


class BridgeError(Exception):
    """An actor did not answer (code "unavailable"), answered with an ErrorReply (its
    code, e.g. "thread_not_found"), or the message could not be encoded (code
    "unencodable": nothing was sent)."""

    def __init__(self, message: str, code: str = "unavailable"):
        super().__init__(message)
        self.code = code


class BridgeTimeout(BridgeError):
    """No answer within the ask's deadline (code "unavailable", as any BridgeError that is
    not an answer): the caller may say what the silence means for its question."""


class ActorBridge:
    def __init__(self, actor_port: int, workers: int = 16):
        self.actor_port = actor_port
        self._local = threading.local()
        self._contexts: list = []
        self._lock = threading.Lock()
        self._lookup = threading.Lock()  # one global-name lookup of the Supervisor at a time
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="actor-bridge")
        self._asys: ActorSystem | None = None
        self.directory: m.Directory | None = None
        self._directory_at = 0.0
        self._known_roles: set[str] = set()  # every role a directory ever named
        self._supervisor = None
        # Called on a worker thread with (role, answer) for an answer nobody waits for any more.
        self.on_stray: Callable[[str, object], None] | None = None

    def start(self) -> None:
        """Join the running actor system (blocking; call before serving). The process must
        have called `actors.system.prepare` first: unsigned frames would be refused."""
        from patches import thespian_transport

        if not thespian_transport.installed():
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
        trace.stamp("ask_call", "edge", msg)
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(self._executor, self.ask_blocking, to, msg, timeout)
        trace.stamp("ask_return", "edge", msg)
        return reply

    async def tell(self, to: str, msg) -> None:
        trace.stamp("tell_call", "edge", msg)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.tell_blocking, to, msg)

    async def refresh_directory(self, force: bool = False) -> m.Directory:
        if force or self.directory is None or time.monotonic() - self._directory_at > DIRECTORY_TTL_S:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self.refresh_directory_blocking)
        return self.directory

    # --- blocking side, on worker threads -----------------------------------------------
    def refresh_directory_blocking(self) -> m.Directory:
        try:
            reply = self._ask_address(self._supervisor, m.GetDirectory(), DIRECTORY_ASK_S)
        except BridgeError:
            # Perhaps replaced (run.py's keeper): the global name says where it is now.
            self._supervisor = self._find_supervisor()
            reply = self._ask_address(self._supervisor, m.GetDirectory(), DIRECTORY_ASK_S)
        if not isinstance(reply, m.Directory):
            raise BridgeError(f"supervisor answered {type(reply).__name__}")
        self.directory, self._directory_at = reply, time.monotonic()
        self._known_roles |= set(reply.entries)
        return reply

    def _find_supervisor(self):
        if not self._lookup.acquire(blocking=False):
            raise BridgeError("no answer from the Supervisor; another thread is looking for it")
        try:
            return self._context().createActor(SupervisorActor, globalName=SUPERVISOR_NAME)
        except Exception as exc:  # Thespian gave up: no leader (ActorSystemRequestTimeout, ...)
            self._drop_context()
            raise BridgeError(f"no Supervisor found: {type(exc).__name__}") from None
        finally:
            self._lookup.release()

    def ask_blocking(self, to: str, msg, timeout: float):
        trace.stamp("ask_thread", "edge", msg)
        deadline = time.monotonic() + timeout
        self._await_role(to, deadline)
        role = to if to != roles.SUPERVISOR and self.directory is not None and to in self.directory.entries else None
        reply = self._ask_address(self._resolve(to), msg, max(0.0, deadline - time.monotonic()), role)
        trace.stamp("ask_thread_done", "edge", msg)
        return reply

    def _await_role(self, role: str, deadline: float) -> None:
        """A role the directory named before and does not now is being recreated: wait
        for its replacement (until `deadline`) rather than fail the question at once."""
        while (
            role in self._known_roles
            and self.directory is not None
            and role not in self.directory.entries
            and time.monotonic() < deadline
        ):
            time.sleep(FOLLOW_SLICE_S)  # on a worker thread, never the event loop
            try:
                self.refresh_directory_blocking()
            except BridgeError:
                pass

    def tell_blocking(self, to: str, msg) -> None:
        trace.stamp("tell_thread", "edge", msg)
        self._context().tell(self._resolve(to), _encoded(msg))

    def _resolve(self, to: str):
        if to == roles.SUPERVISOR:
            return self._supervisor
        if self.directory is None:
            self.refresh_directory_blocking()
        address = self.directory.entries.get(to)
        if address is None:
            raise BridgeError(f"no actor plays {to!r}")
        return addressing.from_string(address)

    def _ask_address(self, address, msg, timeout: float, role: str | None = None):
        """Ask `address`; with `role`, follow the role to a replacement (see above)."""
        expect = m.REPLIES.get(type(msg), ())
        context = self._context()
        deadline = time.monotonic() + timeout
        step = FOLLOW_SLICE_S if role else timeout
        reply = context.ask(address, _encoded(msg), min(step, timeout))
        followed = False
        while True:
            if reply is None and time.monotonic() < deadline:
                moved = self._moved(role, address)
                if moved is not None:
                    address, followed = moved, True
                    reply = context.ask(address, _encoded(msg), min(step, max(0.0, deadline - time.monotonic())))
                else:
                    reply = context.listen(min(step, max(0.0, deadline - time.monotonic())))
                continue
            if reply is None:
                self._drop_context()
                raise BridgeTimeout(f"no answer to {type(msg).__name__} within {timeout:g} s")
            decoded = (
                m.decode(reply)
                if isinstance(reply, (bytes, bytearray))
                else m.Invalid(f"non-bytes reply {type(reply).__name__}")
            )
            if isinstance(decoded, m.Invalid):
                raise BridgeError(f"undecodable reply: {decoded.reason}")
            if isinstance(decoded, m.ErrorReply):
                raise BridgeError(decoded.message, decoded.code)
            if expect and isinstance(decoded, expect) and _answers_another(msg, decoded):
                self._stray(role, decoded)
            elif not expect or isinstance(decoded, expect):
                if followed:  # asked two actors: the other answer may be on its way
                    self._take_stray(context, role, expect)
                return decoded
            reply = context.listen(min(step, max(0.0, deadline - time.monotonic())))

    def _take_stray(self, context, role: str | None, expect) -> None:
        late = context.listen(FOLLOW_SLICE_S)
        decoded = m.decode(late) if isinstance(late, (bytes, bytearray)) else None
        if decoded is not None and isinstance(decoded, expect):
            self._stray(role, decoded)
        self._drop_context()  # a later stray must not reach the next question

    def _stray(self, role: str | None, answer) -> None:
        if self.on_stray is not None and role is not None:
            self.on_stray(role, answer)

    def _moved(self, role: str | None, address):
        """The role's new address if the directory moved it away from `address`."""
        current = self.directory.entries.get(role) if role and self.directory is not None else None
        if current is None or current == addressing.to_string(address):
            return None
        return addressing.from_string(current)

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


def _answers_another(question, answer) -> bool:
    """An answer naming a request id other than the question's: meant for an earlier one."""
    asked, answered = getattr(question, "request_id", None), getattr(answer, "request_id", None)
    return asked is not None and answered is not None and asked != answered
