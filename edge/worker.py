"""One edge worker process: `python -m edge.worker --slot N --fd FD` (run.py starts them).

With SLUICE_WORKERS=N > 1, run.py creates the listening socket itself and starts N of
these; each inherits that one socket (`pass_fds`) and serves it with its own uvicorn, its
own event loop, bridge, hub client, record sender and dashboard sampler. The kernel hands
each new connection to whichever worker accepts it first (one shared accept queue: a
connection waiting in it is never lost when a worker dies, and a replacement serves the
same queue). Why not SO_REUSEPORT: each worker would have an accept queue of its own, and
the connections queued on a worker that is SIGKILLed would be reset with it.

What a worker is told comes on stdin, as one JSON object (never argv, which any local user
can read): the settings run.py loaded (`Settings.to_wire()`), its `edge_id` (chosen by run.py, so that run.py can
announce the loss of exactly this edge to the Coalescers when it dies: `MemberLost(edge,
edge_id)`), the workers' private socket directory (`peers`: each worker also serves on
`<peers>/<slot>.sock`, where the others relay a cancel or resume of one of its requests,
edge/worker_relay.py), and run.py's pid. The cluster secret comes in the environment, as
for the watchdog.

Lifetime: the worker asks the kernel to SIGKILL it when run.py dies (PR_SET_PDEATHSIG;
run.py starts workers from its main thread, which lives as long as run.py), so a
SIGKILLed run.py leaves no worker behind. It is in a session of its own: a Ctrl-C at the
terminal reaches run.py only, which relays SIGINT or SIGTERM to each worker; the worker's
DrainingServer gives them the same meaning as with one process (edge/server.py).

Every response carries `X-Sluice-Worker: <slot>` (the slot number, 1..N; a replacement
keeps its slot), so an operator or a test can tell which worker answered.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys

from protocols.gateway_settings import Settings

PR_SET_PDEATHSIG = 1
WORKER_HEADER = b"x-sluice-worker"


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when `parent` exits (Linux); exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's SIGINT/SIGTERM still reach us
        pass
    if os.getppid() != parent:  # it died before the prctl: nobody would tell us
        sys.exit(1)


class WorkerHeader:
    """ASGI middleware: `X-Sluice-Worker: <slot>` on every HTTP response."""

    def __init__(self, app, slot: int):
        self.app, self.value = app, str(slot).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (WORKER_HEADER, self.value)]}
            await send(message)

        return await self.app(scope, receive, send_with_header)


def serve(settings: Settings, slot: int, edge_id: str, sock: socket.socket, peers: str) -> int:
    import uvicorn

    from edge.http_limits import ConnectionLimits, protocol_class
    from edge.routes import build_app
    from edge.server import DrainingServer
    from edge.worker_relay import WorkerRelay

    app, edge = build_app(settings)
    edge.edge_id = edge_id  # before the lifespan: the hub client and the tickets use it
    edge.relay = WorkerRelay(slot, settings.workers, peers, settings.keepalive_s)
    peer_sock = edge.relay.bind()  # where the other workers relay cancels and resumes
    limits = ConnectionLimits(settings.header_timeout_s, settings.max_connections_per_client)
    server = DrainingServer(
        uvicorn.Config(
            WorkerHeader(app, slot),
            log_level=settings.log_level.lower(),
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=10,
            access_log=False,
            http=protocol_class(limits),
        ),
        edge,
        settings.drain_s,
    )
    try:
        server.run(sockets=[sock, peer_sock])
    except KeyboardInterrupt:
        pass
    finally:
        peer_sock.close()
    return 0 if server.started else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge.worker")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--fd", type=int, required=True, help="the inherited listening socket")
    args = parser.parse_args(argv)
    told = json.loads(sys.stdin.read())
    die_with_parent(told["parent"])
    settings = Settings.from_wire(told["settings"])

    from actors import system
    from protocols import logfmt

    logfmt.configure(settings)
    secret = os.environ.pop("SLUICE_CLUSTER_SECRET", "").encode()
    if not secret:
        print("edge worker: no SLUICE_CLUSTER_SECRET in the environment", file=sys.stderr)
        return 2
    system.prepare(settings.actor_host, secret)
    sock = socket.socket(fileno=args.fd)
    try:
        return serve(settings, args.slot, told["edge_id"], sock, told["peers"])
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
