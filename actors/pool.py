"""The Pool actor: the upstream connection pool, the calls it runs, and the stream hub.

What the Pool decides (which calls run, what Open/Abort/FailStream do, what every ending
owes the Pacer, the Coalescer, the hub and Metrics) is `actors/pool_logic.py`'s
`PoolLogic`, which the simulation runs too; this module hosts it: the upstream I/O (one
task per call, `actors/upstream.py`, the retries inside a call, the httpcore pools), the
stream hub's sockets (actors/hub.py), and the Thespian side.

Thespian has no asyncio integration, so the actor hosts an asyncio loop in one thread
(`PoolRuntime`), and the logic lives on that loop. Control messages go in with
`call_soon_threadsafe`; what the loop must send through Thespian (StreamFinished,
LeaseRelease, Records, HubReady) goes into an outbox and a byte on a socketpair that the
actor watches with `ThespianWatch`, so `self.send` is only ever called on the actor's own
thread.

Invariants: every upstream call has exactly one owner task, and its end reaches the logic
from the task's done callback, so even a call cancelled before it ran is reported (the
logic then releases the lease, tells the Coalescer and ends the stream at the hub). A
call that fails before its first byte may be tried again (`RetryPolicy` decides): nothing
of a failed attempt reaches the hub, so everyone subscribed to the stream, coalesced
followers included, just keeps waiting for the retry.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import threading
import time

from thespian.actors import ActorExitRequest, ThespianWatch, WatchMessage

import patches
from actors import placement, secret
from actors.connections import AccountConnections
from actors.host import HostActor, my_address
from actors.hub import StreamHub
from actors.hub_logic import orphan_after
from actors.key_choice import key_name
from actors.pool_logic import CANCELLED, CallEnd, MarkOpen, PoolLogic, Publish, Start, Stop
from actors.retry_policy import RESET, RetryPolicy, RetrySettings, is_idempotent
from protocols import events as ev
from protocols import messages as m
from protocols import roles, trace
from protocols.effects import After, Send
from protocols.gateway_settings import Settings
from protocols.settings import ProviderConfig

# httpcore, h2, anyio and the provider adapters are imported by the Pool's loop when it
# starts, not here: the Supervisor imports this module and forks every actor from its
# own memory, and none of the other eight processes needs those ~9 MB.

log = logging.getLogger("sluice.pool")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (a dependency on Linux and macOS): the Pool's loop
    carries every token of every stream, and uvloop roughly halves its per-event cost."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# Errors before the first byte that say the key (or the provider behind it) is failing.
# 429 is not one: the key is well, only busy, and the Pacer pauses it for the Retry-After.
KEY_FAILURE_STATUSES = frozenset({401, 403, 500, 502, 503, 504, 529})


def key_verdict(result) -> bool | None:
    """One attempt as its key's circuit sees it (actors/circuit.py): True once a byte of a
    200 arrived, False for a 5xx, 401/403, or a connection/stream failure or timeout before
    the first byte; None (no verdict) for a cancel, a 429 or the request's own fault (400...)."""
    if result.delivered:
        return True
    if result.outcome != "error":
        return None
    status = (result.error or {}).get("status")
    if status is not None:
        return False if status in KEY_FAILURE_STATUSES else None
    return False  # transport: connect, reset, timeout


class PoolRuntime:
    """The asyncio side of the Pool: owns the loop thread, the httpcore pool, the hub."""

    def __init__(self, settings: Settings, outbox: Outbox, role: str = roles.POOL):
        self.settings = settings
        self.outbox = outbox
        self.role = role  # "pool", "pool:1", ...: named in StreamFinished, records and the gauge
        self.loop = new_event_loop()
        self.hub = StreamHub(secret.get(), orphan_s=orphan_after(settings.pacer_max_wait_ms / 1000.0))
        self.logic = PoolLogic(role, self.hub.logic, accounts_of(settings))  # used on the loop only
        self.calls: dict[str, asyncio.Task] = {}  # the task of each call the logic started
        self.pools: dict[tuple[str, bool], AccountConnections] = {}  # (account, h2c) -> its pools, made on the loop
        self.retry = RetryPolicy(RetrySettings.from_config(settings))
        self.hub_port: int | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-loop", daemon=True)

    def start(self, timeout: float = 10.0) -> int:
        patches.install_httpcore()  # before the first upstream connection; raises here, not in the loop
        self._thread.start()
        if not self._ready.wait(timeout) or self.hub_port is None:
            raise RuntimeError("pool loop did not start")
        return self.hub_port

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._setup())
        self._ready.set()
        self.loop.run_forever()

    async def _setup(self) -> None:
        self.hub_port = await self.hub.start(self.settings.actor_host)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        try:
            future.result(timeout=5)
        except Exception:
            log.exception("pool shutdown")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    async def _shutdown(self) -> None:
        for task in list(self.calls.values()):
            task.cancel()
        await asyncio.gather(*self.calls.values(), return_exceptions=True)
        await self.hub.stop()
        for connections in self.pools.values():
            for pool in connections.pools + connections.retired:
                await pool.aclose()

    def _http_for(self, provider: ProviderConfig) -> AccountConnections:
        """The connection pools of the provider's account (actors/connections.py): per account,
        because the keepalive (<ACCOUNT>_KEEPALIVE_S) must stay below that provider's idle timeout.
        HTTP/2 where the provider offers it (ALPN on https). Cleartext http:// URLs are
        HTTP/1.1 unless the provider is configured for prior-knowledge HTTP/2
        (<PREFIX>_H2C, on for the simulated provider; a local Ollama speaks HTTP/1.1)."""
        import httpcore

        h2c = provider.h2c and provider.base_url.startswith("http://")
        key = (provider.account, h2c)
        connections = self.pools.get(key)
        if connections is None:
            keepalive = provider.keepalive_s
            if h2c:
                connections = AccountConnections(
                    lambda: httpcore.AsyncConnectionPool(
                        http1=False, http2=True, max_connections=20, keepalive_expiry=keepalive
                    )
                )
            else:
                connections = AccountConnections(
                    lambda: httpcore.AsyncConnectionPool(
                        http1=True, http2=True, max_connections=100, keepalive_expiry=keepalive
                    )
                )
            self.pools[key] = connections
        return connections

    # --- control messages, called from the actor thread ----------------------------------
    def open(self, msg: m.OpenStream) -> None:
        self.loop.call_soon_threadsafe(self._handle, msg)

    def abort(self, msg: m.AbortStream) -> None:
        self.loop.call_soon_threadsafe(self._handle, msg)

    def fail(self, msg: m.FailStream) -> None:
        self.loop.call_soon_threadsafe(self._handle, msg)

    def report_active(self) -> None:
        """Send the active-streams gauge again, changed or not (a Metrics actor that has not
        had it: the first, or a replacement)."""
        self.loop.call_soon_threadsafe(lambda: self._apply(self.logic.flush_with_gauge(time.time())))

    def member_lost(self, msg: m.MemberLost) -> None:
        """A Coalescer shard died: the streams it left unopened end at the hub (the Pacer
        it queued them at may have died with it: actors/hub_logic.py `owner_lost`)."""
        if roles.is_coalescer(msg.role):
            self.loop.call_soon_threadsafe(self.hub.owner_lost, msg.role, msg.incarnation)

    def configure(self, settings: Settings) -> None:
        """A new Wire's settings (the provider entries are read at each call's start)."""
        self.settings = settings
        self.loop.call_soon_threadsafe(setattr, self.logic, "accounts", accounts_of(settings))

    def state(self) -> dict:
        return asyncio.run_coroutine_threadsafe(self._state(), self.loop).result(timeout=2)

    # --- on the loop ------------------------------------------------------------------------
    def _handle(self, msg) -> None:
        if isinstance(msg, m.OpenStream):
            trace.stamp("pool_open", "pool", msg)
        elif isinstance(msg, m.AbortStream):
            trace.stamp("pool_abort", "pool", msg)
        self._apply(self.logic.handle(msg, time.time()))

    def _apply(self, effects: list) -> None:
        """Carry out the logic's effects (on the loop)."""
        for effect in effects:
            if isinstance(effect, Send):
                self.outbox.put(effect)
            elif isinstance(effect, Publish):
                self.hub.publish(effect.stream_id, effect.events)
            elif isinstance(effect, MarkOpen):
                self.hub.mark_open(effect.stream_id)
            elif isinstance(effect, Start):
                self._start(effect.open)
            elif isinstance(effect, Stop):
                task = self.calls.get(effect.stream_id)
                if task is not None and not task.done():
                    task.cancel()
            elif isinstance(effect, After):
                self.loop.call_later(max(0.0, effect.delay_s), self._handle, effect.msg)
            else:
                log.error("pool: unknown effect %r", effect)

    def _start(self, msg: m.OpenStream) -> None:
        task = self.loop.create_task(self._call(msg))
        self.calls[msg.stream_id] = task
        # The end goes to the logic from the done callback, not from inside the task: a
        # task cancelled before its first step never runs its own `finally`.
        task.add_done_callback(lambda t: self._ended(msg.stream_id, t))

    def _ended(self, stream_id: str, task: asyncio.Task) -> None:
        if self.calls.get(stream_id) is task:
            del self.calls[stream_id]
        # None when cancelled before it ran (`_call` catches a later cancel and any error)
        result = None if task.cancelled() or task.exception() is not None else task.result()
        self._apply(self.logic.ended(stream_id, call_end(result), time.time()))

    async def _call(self, msg: m.OpenStream):
        """Run the upstream call; -> its last attempt's result, or None (no result: not
        configured, crashed or cancelled; what reached the hub says why)."""
        entry = self.settings.providers.get(msg.provider)
        publish = lambda events: self.hub.publish(msg.stream_id, events)  # noqa: E731
        try:
            if entry is None or not entry.base_url:
                publish([ev.error("provider_not_configured", f"provider {msg.provider!r} is not configured")])
                return None
            return await self._attempts(msg, entry, publish)
        except asyncio.CancelledError:
            return None  # run_call or _attempts published the cancellation; the logic records the abort
        except Exception as exc:
            log.exception("upstream call %s crashed", msg.stream_id)
            publish([ev.error("internal_error", f"pool: {type(exc).__name__}")])
            return None

    async def _attempts(self, msg: m.OpenStream, provider: ProviderConfig, publish):
        """Call the provider until an attempt delivers a byte, or the retry policy says
        stop; then publish the last attempt's error if it has not gone out yet. Attempt n
        goes out on the n-th key of `msg.keys` (round): a retry escapes one key's failure."""
        from actors.upstream import run_call
        from protocols.providers import adapter_for

        # an embeddings request or a token count runs as a call whose "stream" is one JSON body
        adapter = adapter_for(provider.adapter, msg.body)
        account = provider.account
        api_keys = provider.api_keys
        order = [k for k in (msg.keys or [msg.key]) if 0 <= k < len(api_keys)] or [0]
        connections = self._http_for(provider)
        idempotent = is_idempotent(msg.body)
        first_sent = time.time()
        self.retry.note_call(account, first_sent)
        verdicts: dict[int, bool] = {}  # key -> its last attempt's verdict (actors/circuit.py)
        attempt = 1
        while True:
            key = order[(attempt - 1) % len(order)]
            request = adapter.build_request(
                base_url=provider.base_url, api_key=api_keys[key], model=msg.model, body=msg.body
            )
            served = {"provider": msg.provider, "model": msg.model}
            if len(api_keys) > 1:
                served["key"] = key_name(key)
            if msg.fallback_from:
                served["fallback_from"] = msg.fallback_from
            with connections.lease() as http:
                result = await run_call(
                    http,
                    adapter,
                    request,
                    publish,
                    msg.queue_wait_ms,
                    self._timeouts(),
                    attempt,
                    served,
                    first_sent,
                    max_duration_s=self.settings.upstream_max_duration_s,
                )
            if result.failure is not None and result.failure.reason == RESET and not result.delivered:
                connections.retire(http)  # the retry goes out on a fresh connection
            for pool in connections.idle_retired():
                await pool.aclose()
            result.attempts, result.first_sent_at, result.key = attempt, first_sent, key
            verdict = key_verdict(result)
            if verdict is not None:
                verdicts.pop(key, None)
                verdicts[key] = verdict
            if result.outcome != "error" or result.delivered or result.failure is None:
                break
            decision = self.retry.decide(account, result.failure, attempt, idempotent, first_sent, time.time())
            if not decision.retry:
                if attempt > 1 or decision.why_not in ("non_idempotent", "budget", "deadline"):
                    log.warning(
                        "upstream gives up: account=%s reason=%s attempt=%d why=%s stream=%s",
                        account,
                        result.failure.reason,
                        attempt,
                        decision.why_not,
                        msg.stream_id,
                    )
                break
            self._retrying(msg, account, result, attempt, decision)
            if decision.delay_s > 0:
                try:
                    await asyncio.sleep(decision.delay_s)
                except asyncio.CancelledError:
                    result.outcome, result.error = "cancelled", ev.error("cancelled", CANCELLED)
                    publish([result.error])
                    raise
            attempt += 1
        result.key_results = [[k, ok] for k, ok in verdicts.items()]
        if result.outcome == "error" and not result.delivered:
            error = dict(result.error)
            if attempt > 1:
                error["attempts"] = attempt
            publish([error])
        return result

    def _retrying(self, msg: m.OpenStream, account: str, result, attempt: int, decision) -> None:
        reason = result.failure.reason
        log.warning(
            "upstream retry: account=%s key=%s reason=%s attempt=%d/%d delay=%.3fs error=%s stream=%s (%s)",
            account,
            key_name(result.key),
            reason,
            attempt + 1,
            self.retry.settings.max_attempts,
            decision.delay_s,
            (result.error or {}).get("code"),
            msg.stream_id,
            (result.error or {}).get("message"),  # what broke, for whoever reads the log
        )
        self._apply(
            self.logic.retrying(msg.stream_id, account, result.key, reason, attempt, decision.pause_s, time.time())
        )

    def _timeouts(self) -> dict:
        connect = self.settings.upstream_connect_timeout_s
        return {"connect": connect, "read": self.settings.upstream_read_timeout_s, "write": connect, "pool": connect}

    async def _state(self) -> dict:
        connections = [
            str(c) for shards in self.pools.values() for pool in shards.pools + shards.retired for c in pool.connections
        ]
        return {
            "role": self.role,
            "open_calls": sorted(self.logic.calls),
            "connections": connections,
            "hub": self.hub.state(),
            "patches": patches.installed(),
        }


class Outbox:
    """Effects produced on the loop thread, carried out on the actor thread."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.wake_r, self._wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = threading.Event()  # a wake-up byte is on its way: no need for another

    def put(self, effect) -> None:
        self._queue.put(effect)
        if not self._woken.is_set():
            self._woken.set()
            try:
                self._wake_w.send(b"\0")
            except (BlockingIOError, OSError):
                pass  # the socket is full of wake-ups already

    def drain(self) -> list:
        try:
            while self.wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        # After reading the wake-ups and before taking the effects: a put that saw the
        # flag set has already queued its effect (taken below); any later put sends a
        # new byte. Cleared before reading, a byte sent in between would be swallowed
        # with the flag left set, and every later effect would wait forever.
        self._woken.clear()
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.wake_r.close()
        self._wake_w.close()


class PoolActor(HostActor):
    role = roles.POOL
    # A member host's Pools run on that host (the Supervisor names it), the others on the leader.
    actorSystemCapabilityCheck = staticmethod(placement.on_host)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runtime: PoolRuntime | None = None
        self.outbox = Outbox()
        self.metrics_told: str | None = None  # the Metrics actor that has this Pool's gauge

    def on_wire(self, wire: m.Wire) -> None:
        self.role = wire.role  # "pool", "pool:1", ... (SLUICE_POOLS of them, each with its own hub)
        if self.runtime is None:
            self.runtime = PoolRuntime(self.settings, self.outbox, self.role)
            self.runtime.logic.incarnation = my_address(self)  # before the loop runs: a slice's grant names it
            self.runtime.start()
        else:
            self.runtime.configure(self.settings)
        # On every Wire, not only the first: a replacement Supervisor that adopted this
        # Pool learns where its hub is the same way.
        self.apply([Send(roles.SUPERVISOR, m.HubReady(self.settings.actor_host, self.runtime.hub_port, self.role))])
        # The active-streams gauge (0 while idle) to each new Metrics actor: every Pool's series
        # is in /metrics from the start, not only once it has carried a stream.
        metrics = self.directory.get(roles.METRICS)
        if metrics is not None and metrics != self.metrics_told:
            self.metrics_told = metrics
            self.runtime.report_active()

    def on_message(self, msg, sender, now):
        if self.runtime is None:
            return [Send(sender, m.ErrorReply("not_ready", "pool not wired yet"))] if sender else []
        if isinstance(msg, m.OpenStream):
            self.runtime.open(msg)
        elif isinstance(msg, m.AbortStream):
            self.runtime.abort(msg)
        elif isinstance(msg, m.FailStream):
            self.runtime.fail(msg)
        elif isinstance(msg, m.MemberLost):
            self.runtime.member_lost(msg)
        elif isinstance(msg, m.Admin):
            if msg.command == "show":
                return [Send(sender, m.AdminResult(True, self.runtime.state()))]
            return [Send(sender, m.AdminResult(False, {}, f"pool: unknown command {msg.command!r} (show)"))]
        return []

    def state(self, now: float) -> dict:
        return self.runtime.state() if self.runtime else {"wired": False}

    def on_system(self, msg, sender) -> None:
        if isinstance(msg, WatchMessage):
            self.apply(self.outbox.drain())
        elif isinstance(msg, ActorExitRequest) and self.runtime is not None:
            self.runtime.stop()
            self.runtime = None
            self.outbox.close()

    def watch(self):
        return ThespianWatch([self.outbox.wake_r.fileno()]) if self.runtime is not None else None


def accounts_of(settings: Settings) -> dict[str, str]:
    """provider -> the account it bills to (its Pacer's), from the settings' provider entries."""
    return {name: entry.account for name, entry in settings.providers.items()}


def call_end(result) -> CallEnd | None:
    """An upstream call's last `CallResult` (actors/upstream.py) as the logic reads it."""
    if result is None:
        return None
    return CallEnd(
        outcome=result.outcome,
        error=result.error,
        retry_after_s=result.retry_after_s,
        sent_at=result.first_sent_at or result.sent_at,
        first_byte_at=result.first_byte_at,
        ended_at=result.ended_at,
        attempts=result.attempts,
        key_results=result.key_results,
        usage=result.usage,
    )
