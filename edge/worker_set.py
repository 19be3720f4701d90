"""run.py's side of SLUICE_WORKERS=N > 1: one listening socket, N edge worker processes
(edge/worker.py) serving it, a dead worker replaced, run.py's signals relayed.

`WorkerSet.serve()` runs on run.py's main thread once the actor system is up (the workers
are spawned, never forked from this threaded process: `subprocess` execs a fresh Python).
It watches the workers every `WATCH_EVERY_S`:

- a worker that exits while serving (SIGKILL, OOM, a crash) is replaced in the same slot,
  with a new edge id, and `on_lost(edge_id)` runs, which has run.py tell the Supervisor
  `MemberLost(edge, edge_id)`: the Coalescers drop the references the dead edge held, so
  calls nobody listens to any more are aborted and their leases return. Its clients'
  connections were closed by the kernel when it died: that is their terminal event (a
  dead process cannot write an SSE error event). A worker that keeps dying at start is
  replaced at most once per `RESTART_EVERY_S`.
- SIGTERM is relayed to every worker (each drains: /readyz 503 at once, open streams
  finish for up to SLUICE_DRAIN_S, edge/server.py); run.py waits for them all to exit.
- SIGINT (or a second SIGTERM) is relayed as SIGINT: every worker stops now. A second
  SIGINT, or workers still running `KILL_AFTER_S` after the stop began, get SIGKILL.

It also owns the workers' socket directory (`socket_dir`: 0700, removed when serve()
ends): each worker serves there too, so that the others can relay a cancel or resume
(edge/worker_relay.py).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from protocols.gateway_settings import Settings

log = logging.getLogger("sluice.workers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WATCH_EVERY_S = 0.1
RESTART_EVERY_S = 1.0
KILL_AFTER_S = 15.0  # beyond the drain: uvicorn's own graceful shutdown takes up to 10 s


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The one listening socket every worker inherits (SO_REUSEADDR, as uvicorn binds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog)
    sock.set_inheritable(True)
    return sock


def socket_dir(settings: Settings) -> str:
    """A new 0700 directory for the workers' sockets: `workers-<SLUICE_ACTOR_PORT>` next to
    SLUICE_DB, like the cluster secret file (two gateways on one machine never share one;
    what a SIGKILLed run.py left there is replaced at the next start). A fresh temporary
    directory instead when that path is too long for a Unix socket or cannot be made ours."""
    path = os.path.join(os.path.dirname(os.path.abspath(settings.db)), f"workers-{settings.actor_port}")
    if len(path) + len("/9999.sock") < 100:  # sun_path holds 108 bytes
        shutil.rmtree(path, ignore_errors=True)  # a killed run.py's (rmtree follows no symlink)
        try:
            os.mkdir(path, 0o700)  # fails if anyone made it meanwhile: then not this one
            return path
        except OSError:
            pass
    return tempfile.mkdtemp(prefix="sluice-workers-")


@dataclass
class Worker:
    slot: int
    edge_id: str
    proc: subprocess.Popen
    started_at: float


class WorkerSet:
    def __init__(
        self,
        settings: Settings,
        count: int,
        sock: socket.socket,
        secret: bytes,
        on_lost: Callable[[str], None] = lambda edge_id: None,
    ):
        self.settings, self.count, self.sock, self.secret = settings, count, sock, secret
        self.on_lost = on_lost
        self.workers: dict[int, Worker] = {}
        self.replacements = 0
        self.stop_signal: int | None = None  # SIGTERM (drain) or SIGINT (now), once asked
        self.kill_at: float | None = None
        self._wake = threading.Event()
        self.peers = ""  # the workers' socket directory, while serve() runs

    # --- processes --------------------------------------------------------------------------
    def spawn(self, slot: int) -> Worker:
        edge_id = f"edge-w{slot}-{secrets.token_hex(8)}"  # random: the hub tickets name it
        fd = self.sock.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge.worker", "--slot", str(slot), "--fd", str(fd)],
            cwd=ROOT,
            pass_fds=[fd],
            stdin=subprocess.PIPE,
            env={**os.environ, "SLUICE_CLUSTER_SECRET": self.secret.decode()},
            start_new_session=True,  # a Ctrl-C meant for run.py is relayed by run.py, once
        )
        told = {"settings": self.settings.to_wire(), "edge_id": edge_id, "parent": os.getpid(), "peers": self.peers}
        try:
            proc.stdin.write(json.dumps(told).encode())
            proc.stdin.close()
        except BrokenPipeError:  # it died at once; the watch loop replaces it
            pass
        worker = Worker(slot, edge_id, proc, time.monotonic())
        self.workers[slot] = worker
        return worker

    def pids(self) -> dict[int, int]:
        return {slot: w.proc.pid for slot, w in self.workers.items()}

    # --- run.py's main loop -----------------------------------------------------------------
    def serve(self) -> int:
        """Start the workers and watch them until they have all exited after a signal."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        # Each worker's Unix socket for the others' relayed cancels and resumes
        # (edge/worker_relay.py), in a 0700 directory: only the gateway's user may connect.
        self.peers = socket_dir(self.settings)
        try:
            for slot in range(1, self.count + 1):
                self.spawn(slot)
            log.info(
                "%d edge workers serving http://%s:%d",
                self.count,
                self.settings.host,
                self.sock.getsockname()[1],
            )
            while True:
                self._wake.wait(WATCH_EVERY_S)
                self._wake.clear()
                if self.stop_signal is None:
                    self._replace_dead()
                elif self._all_exited():
                    return 0
                elif self.kill_at is not None and time.monotonic() >= self.kill_at:
                    self._kill_all()
        finally:
            self._kill_all()
            shutil.rmtree(self.peers, ignore_errors=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig, frame) -> None:
        """A signal handler: relays the signal and sets flags; the loop does the rest."""
        if self.stop_signal is None and sig == signal.SIGTERM:
            self.stop_signal = signal.SIGTERM
            self.kill_at = time.monotonic() + self.settings.drain_s + KILL_AFTER_S
            self._relay(signal.SIGTERM)
        elif self.stop_signal == signal.SIGINT and sig == signal.SIGINT:
            self.kill_at = time.monotonic()  # a second Ctrl-C: do not wait
        else:
            self.stop_signal = signal.SIGINT
            self.kill_at = min(self.kill_at or float("inf"), time.monotonic() + KILL_AFTER_S)
            self._relay(signal.SIGINT)
        self._wake.set()

    def _relay(self, sig: int) -> None:
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                try:
                    worker.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def _replace_dead(self) -> None:
        now = time.monotonic()
        for slot, worker in list(self.workers.items()):
            code = worker.proc.poll()
            if code is None or self.stop_signal is not None:
                continue
            if now - worker.started_at < RESTART_EVERY_S:
                continue  # died at start: try again a little later, not in a tight loop
            log.error("edge worker %d (pid %d) exited with %s; starting a replacement", slot, worker.proc.pid, code)
            try:
                self.on_lost(worker.edge_id)
            except Exception:  # the replacement matters more than the announcement
                log.exception("announcing the loss of edge worker %d", slot)
            self.replacements += 1
            self.spawn(slot)

    def _all_exited(self) -> bool:
        return all(w.proc.poll() is not None for w in self.workers.values())

    def _kill_all(self) -> None:
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                log.warning("edge worker %d (pid %d) did not exit: SIGKILL", worker.slot, worker.proc.pid)
                worker.proc.kill()
            worker.proc.wait()
