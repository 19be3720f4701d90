"""Start sluice: `python run.py` serves; `python run.py admin ...` talks to a running one.

Order matters. The cluster secret is settled first (SLUICE_CLUSTER_SECRET, or a random
one written to a 0600 file for the admin CLI and removed on exit). The actor system is
started next, from a process with no threads yet (multiprocTCPBase forks its admin, and
forking a threaded process is unsafe), every frame authenticated with that secret and
every socket bound to SLUICE_ACTOR_HOST (docs/security.md). Then the simulated provider
(when no real provider is configured), then uvicorn with the edge, in this process, on
SLUICE_HOST -- or, with SLUICE_WORKERS=N > 1, N edge worker processes sharing one
listening socket that this process opens, watches and replaces (edge/worker_set.py).
SIGTERM drains first (/readyz 503, new requests 503, open streams finish for up to
SLUICE_DRAIN_S: edge/server.py); SIGINT does not wait. Then open streams get a
terminal event, uvicorn stops, the actor system shuts down, the simulated provider is
stopped, the secret file is removed; nothing is left running. If this process dies
without that, the actor system's admin notices within a second and shuts the actor
system down (patches/thespian_admin_watch.py); with the admin gone, the orphan watchdog
(a process of its own) does. While serving, a keeper thread replaces a dead Supervisor
(and starts the watchdog once the admin is gone, and again if it dies); a Supervisor
lost before every actor was up fails the start instead: its actor system is stopped, its
actors with it, and everything is started again, once (docs/reliability.md). Every
process logs in the SLUICE_LOG_FORMAT (protocols/logfmt.py).

With SLUICE_JOIN=host:port this host is a member of the cluster led by the actor system
there (a Thespian Convention, docs/scale-out.md): its actor system registers with the
leader's (the start fails, exit 2, if the leader does not answer: down, unreachable, or
another SLUICE_CLUSTER_SECRET), it starts no Supervisor, Pacer, shard or Metrics of its
own (the leader's Supervisor places this host's Pools on it) and no simulated provider
(the Pools call what the leader configured); its edges serve as on one host, with the
leader's actors. With SLUICE_JOIN=A:port,B:port (the leader candidates, the same on every
host) the actor system starts undecided: this host follows the candidate that leads, or
leads itself (actors/leadership.py `at_start`), and its keeper moves the lead when the
leader is lost (a standby leader: docs/scale-out.md).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import sys
import threading
from dataclasses import replace

from protocols import config
from protocols.gateway_settings import Settings


def main(argv: list[str]) -> int:
    if argv[:1] == ["admin"]:
        from edge.admin_cli import main as admin_main

        return admin_main(argv[1:])
    try:
        settings = config.load(os.environ)
        _check_alert_thresholds(settings.alert_thresholds)
        _check_keys_file(settings.api_keys_file)
        _check_thread_store_file(settings)
    except config.ConfigError as exc:
        print(f"sluice: configuration error: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


def _check_alert_thresholds(thresholds: dict) -> None:
    from protocols.settings import validate_thresholds

    try:
        validate_thresholds(thresholds)
    except ValueError as exc:
        raise config.ConfigError(f"{config.ALERT_PREFIX}*: {exc}") from None


def _check_keys_file(path: str | None) -> None:
    """A bad client keys file stops the start (exit 2) before anything runs."""
    if path is None:
        return
    from edge.api_keys import KeysFileError, read_keys_file

    try:
        read_keys_file(path)
    except KeysFileError as exc:
        raise config.ConfigError(f"SLUICE_API_KEYS_FILE: {exc}") from None


def _check_thread_store_file(settings: Settings) -> None:
    """A SLUICE_DB the thread store could not open (a directory, another kind of file, a
    folder it cannot write) stops the start (exit 2), on a host that may run the thread
    store (it leads, or is a leader candidate). Otherwise the store's Wire failed, the
    directory never became whole, and run.py gave up 30 s later with "the Pool's stream hub
    did not come up". Looked at, never opened: a second run.py started by mistake beside a
    running gateway must not write its file (the store's open runs the crash recovery,
    which marks every reply still streaming `interrupted`)."""
    from actors.leadership import candidates_of

    if settings.join is not None and f"{settings.actor_host}:{settings.actor_port}" not in candidates_of(settings.join):
        return  # a member: the leader's thread store holds the threads
    if problem := _sqlite_file_problem(settings.db):
        raise config.ConfigError(f"SLUICE_DB={settings.db!r}: {problem}")


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file


def _sqlite_file_problem(path: str) -> str | None:
    """Why the thread store could not open or create a database at `path`, or None. The
    store opens it in WAL mode: SQLite writes `-wal` and `-shm` files beside it, so the
    folder must be writable too."""
    path = os.path.realpath(path)  # a symlink's target is what SQLite opens or creates
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return exc.strerror or str(exc)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return "is a directory"
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read below for ever
            return "is not a regular file"
        try:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as exc:
            return exc.strerror or str(exc)
        if head and head != SQLITE_HEADER:  # an empty file is one SQLite makes a database of
            return "is not an SQLite database"
        if not os.access(path, os.W_OK):
            return "is not writable"
    folder = os.path.dirname(path)
    while not os.path.exists(folder):  # the store makes the missing folders
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is not a directory"
    return None if os.access(folder, os.W_OK | os.X_OK) else f"{folder} is not writable (SQLite writes beside the file)"


def serve(settings: Settings) -> int:
    from protocols import logfmt

    logfmt.configure(settings)  # hpack's header dumps (API keys) are never logged, at any level
    log = logging.getLogger("sluice")
    for name, host, port in (
        ("SLUICE_PORT", settings.host, settings.port),
        ("SLUICE_ACTOR_PORT", settings.actor_host, settings.actor_port),
    ):
        if not _port_free(host, port):
            log.error("sluice: %s=%s is already in use on %s", name, port, host)
            return 2
    if settings.api_keys_file is None:
        log.warning("no SLUICE_API_KEYS_FILE: every client is allowed")
    else:
        log.info(
            "client API keys from %s; coalescing scope: %s",
            settings.api_keys_file,
            settings.coalesce_scope,
        )
    for name, provider in settings.providers.items():
        if name != "simulated" and provider.api_keys[0] is None and provider.adapter != "ollama":
            log.warning("provider %s has no API key (%s_API_KEY): its calls will fail upstream", name, provider.account)

    from actors import secret_file

    secret_path = None
    if settings.cluster_secret:
        secret = settings.cluster_secret.encode()
    else:
        secret_path = secret_file.path_for(settings)
        try:
            secret = secret_file.create(secret_path)
        except OSError as exc:
            print(
                f"sluice: cannot write the cluster secret file {secret_path}: {exc.strerror} "
                "(set SLUICE_SECRET_FILE or SLUICE_CLUSTER_SECRET)",
                file=sys.stderr,
            )
            return 2
    from actors.keeper import SupervisorLostAtStart

    try:
        for attempt in range(1 + START_AGAIN):
            try:
                return _serve_with_secret(settings, secret, log)
            except SupervisorLostAtStart as exc:
                again = attempt < START_AGAIN
                log.error("sluice: %s: %s", exc, "starting the actor system again" if again else "giving up")
        return 1
    finally:
        if secret_path is not None:
            secret_file.remove(secret_path)


JOIN_WITHIN_S = 15.0  # a member's first registration with its leader, answered
DIRECTORY_WITHIN_S = 15.0  # the keeper remembers the first complete directory (the actors started) by then
# A Supervisor lost before that: its actor system is stopped (its actors with it) and started
# again this many times (docs/reliability.md); then run.py exits 1.
START_AGAIN = 1


def _serve_with_secret(settings: Settings, secret: bytes, log) -> int:
    from actors import system
    from actors.keeper import SupervisorLostAtStart
    from actors.leadership import Leadership, candidates_of
    from actors.supervisor import SupervisorActor
    from protocols import logfmt, roles
    from protocols import messages as m
    from protocols.roles import SUPERVISOR_NAME

    host, join = settings.actor_host, settings.join
    me = f"{host}:{settings.actor_port}"
    leadership = Leadership(candidates_of(join), me) if join is not None else None
    standby = leadership is not None and leadership.standby
    asys, group = system.start(
        host,
        settings.actor_port,
        secret,
        logfmt.actor_log_defs(settings),
        join=None if standby else join,
        pools=settings.pools,
        undecided=standby,
    )
    # The secret never travels in a message: every actor inherited it at fork.
    settings = replace(settings, cluster_secret=None)
    sims: list = []
    keeper = None
    lost_at_start = False
    watchdog = _Watchdog(host, settings.actor_port, group)
    try:
        if standby:
            assert leadership is not None
            join = _choose_leader(asys, leadership)
            if join is None:
                log.error(
                    "sluice: no leader candidate of SLUICE_JOIN=%s leads within %.0f s: is one up, reachable "
                    "from %s, and is SLUICE_CLUSTER_SECRET theirs?",
                    settings.join,
                    JOIN_WITHIN_S,
                    host,
                )
                return 2
            if join == me:
                system.lead(asys, me, term=1)
                join = None
            else:
                system.follow(asys, join)

        def promote() -> Settings:
            """This host takes the lead (its keeper decided): the leader's settings."""
            sim, leader_settings = _start_simulated_provider(settings, log)
            sims.extend([sim] if sim is not None else [])
            return leader_settings

        standby_args: dict = {"leadership": leadership, "promote": promote} if standby else {}
        if join is None:
            sim, settings = _start_simulated_provider(settings, log)
            sims.extend([sim] if sim is not None else [])
            supervisor = asys.createActor(SupervisorActor, globalName=SUPERVISOR_NAME)
            asys.tell(supervisor, m.encode(m.Wire(roles.SUPERVISOR, {}, settings.to_wire())))
            keeper = _start_keeper(asys, settings, watchdog, first=supervisor, **standby_args)
            # Serve only once the keeper knows every actor: a Supervisor killed from then on
            # is replaced by one that adopts them all (docs/reliability.md). One killed before
            # leaves actors nobody knows: this actor system ends, they with it (SIGKILL at once:
            # nothing was served, they hold nothing for anyone), and serve() starts a new one.
            try:
                if not keeper.wait_for_directory(DIRECTORY_WITHIN_S):
                    log.warning("sluice: no complete directory within %.0f s: serving anyway", DIRECTORY_WITHIN_S)
            except SupervisorLostAtStart:
                lost_at_start = True
                raise
        else:
            if not system.joined(asys, JOIN_WITHIN_S):
                log.error(
                    "sluice: could not join the cluster at SLUICE_JOIN=%s within %.0f s: is the leader up, "
                    "reachable from %s, and is SLUICE_CLUSTER_SECRET the leader's?",
                    join,
                    JOIN_WITHIN_S,
                    host,
                )
                return 2
            shards = _leader_shards(asys)
            if isinstance(shards, str):
                log.error("sluice: joined the cluster at SLUICE_JOIN=%s, but %s", join, shards)
                return 2
            if shards != settings.coalescer_shards:
                if "COALESCER_SHARDS" in os.environ:
                    log.error(
                        "sluice: joined the cluster at SLUICE_JOIN=%s, but COALESCER_SHARDS=%d here and %d on the "
                        "leader: set the same",
                        join,
                        settings.coalescer_shards,
                        shards,
                    )
                    return 2
                settings = replace(settings, coalescer_shards=shards)  # unset here: the leader's count
            log.info("joined the cluster led by %s", join)
            if standby:
                standby_args["leader"] = join
            keeper = _start_keeper(asys, settings, watchdog, keep_supervisor=False, **standby_args)
        if settings.workers > 1:
            return _serve_workers(settings, secret, asys, log)
        return _serve_http(settings, log)
    finally:
        if keeper is not None:
            keeper.stop()
        watchdog.stop()
        system.stop(asys, group, 0.0 if lost_at_start else system.STOP_GRACE_S, expected=lost_at_start)
        for sim in sims:
            from sim.provider import stop_subprocess

            stop_subprocess(sim)
        log.info("sluice stopped")


class _Watchdog:
    """The orphan watchdog process (actors/system.py `watch`), restarted if it dies; none
    while the actor system's admin lives and watches run.py itself (patches/
    thespian_admin_watch.py, armed by `system.start`). `ensure` (the keeper, each turn)
    starts one once that admin is gone, and from then on; so does a thread woken by the
    admin's exit (`_on_admin_exit`), at once rather than at the keeper's next turn."""

    def __init__(self, host: str, port: int, group: int | None):
        from actors import system
        from patches import thespian_admin_watch

        self.args, self.proc = (os.getpid(), host, port, group), None
        self._lock, self._stopped = threading.Lock(), False
        # Found now, while the admin is the only member of its group with a parent outside it.
        self.admin = system.admin_pid(group) if group is not None and thespian_admin_watch.installed() else None
        self._watch_admin_exit()

    def _watch_admin_exit(self) -> None:
        """run.py and the admin killed within one keeper turn (0.25 s, or seconds while an
        ask waits) left the actors running: nobody watched run.py any more. A pidfd of the
        admin wakes a thread the moment it exits; where there is none (not Linux 5.3+, or
        the admin already gone), the keeper's turn still notices."""
        from actors.system import pidfd

        if self.admin is not None and (fd := pidfd(self.admin)) is not None:
            threading.Thread(target=self._on_admin_exit, args=(fd,), name="admin-exit", daemon=True).start()

    def _on_admin_exit(self, fd: int) -> None:
        from actors.system import wait_for_exit

        wait_for_exit(fd)
        self.ensure()

    def ensure(self) -> None:
        from actors.system import alive, start_watchdog

        with self._lock:
            if self.args[3] is None or self._stopped:
                return
            if self.admin is not None:
                if alive(self.admin, self.args[3]):  # in the group: not a reused pid
                    return
                logging.getLogger("sluice").warning(
                    "the actor system's admin (pid %d) is gone: starting the orphan watchdog process", self.admin
                )
                self.admin = None
            if self.proc is None or self.proc.poll() is not None:
                self.proc = start_watchdog(*self.args)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True  # run.py stops the system next: the admin's exit is expected
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


def _leader_shards(asys) -> int | str:
    """The leader's Coalescer shard count, or what went wrong. Edges hash each request to
    one of COALESCER_SHARDS shards: a member host counting otherwise than the leader would
    send identical requests at two hosts to different shards (or to none)."""
    import time

    from actors.supervisor import SupervisorActor
    from protocols import messages as m
    from protocols.roles import SUPERVISOR_NAME, is_coalescer

    supervisor = asys.createActor(SupervisorActor, globalName=SUPERVISOR_NAME)  # the leader's
    deadline = time.monotonic() + JOIN_WITHIN_S
    while time.monotonic() < deadline:
        reply = asys.ask(supervisor, m.encode(m.GetDirectory()), 2.0)
        directory = m.decode(reply) if isinstance(reply, (bytes, bytearray)) else None
        if isinstance(directory, m.Directory) and directory.settings.get("complete"):
            return sum(1 for role in directory.entries if is_coalescer(role))
        time.sleep(0.1)  # the leader is still wiring this host's Pools: nothing to wait on
    return f"the leader's Supervisor gave no complete directory within {JOIN_WITHIN_S:.0f} s"


def _choose_leader(asys, leadership) -> str | None:
    """With a standby leader (SLUICE_JOIN lists the candidates): the candidate to follow,
    this host's own address to lead, or None when none leads within JOIN_WITHIN_S
    (actors/leadership.py `at_start`: a candidate that already leads wins; with none, the
    first candidate that is up)."""
    import time

    from actors import system

    deadline = time.monotonic() + JOIN_WITHIN_S
    probes = system.Prober(asys)
    try:
        while time.monotonic() < deadline:
            chosen = leadership.at_start(probes.probe)
            if chosen is not None:
                return chosen
            time.sleep(0.25)  # an earlier candidate is starting too: nothing to wait on but its answer
    finally:
        probes.close()
    return None


def _start_keeper(asys, settings: Settings, watchdog: _Watchdog, keep_supervisor: bool = True, **standby):
    from actors.keeper import SupervisorKeeper

    watchdog.ensure()
    return SupervisorKeeper(asys, settings, watchdog.ensure, keep_supervisor, **standby).start()


def _start_simulated_provider(settings: Settings, log):
    """The simulated provider's process when it is configured without a base URL, and the
    settings with its URL filled in."""
    simulated = settings.providers.get("simulated")
    if simulated is None or simulated.base_url:
        return None, settings
    from protocols.config import reachable_host
    from sim.provider import start_subprocess

    host = settings.actor_host
    proc, port = start_subprocess(port=settings.sim_port, host=host)
    simulated = replace(simulated, base_url=f"http://{reachable_host(host)}:{port}")
    log.info("simulated provider on %s", simulated.base_url)
    return proc, replace(settings, providers={**settings.providers, "simulated": simulated})


def _serve_http(settings: Settings, log) -> int:
    import uvicorn

    from edge.http_limits import ConnectionLimits, protocol_class
    from edge.routes import build_app
    from edge.server import DrainingServer

    app, edge = build_app(settings)
    limits = ConnectionLimits(settings.header_timeout_s, settings.max_connections_per_client)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level.lower(),
            log_config=None,  # uvicorn's lines go to our handler, in our format
            lifespan="on",
            timeout_graceful_shutdown=10,  # after the drain: streams have had their terminal event
            access_log=False,  # ours is edge/access_log.py
            http=protocol_class(limits),  # header deadline, per-address cap: edge/http_limits.py
        ),
        edge,
        settings.drain_s,
    )
    log.info("sluice listening on http://%s:%d", settings.host, settings.port)
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # a Ctrl-C before uvicorn took the signals over
    return 0 if server.started else 1


def _serve_workers(settings: Settings, secret: bytes, asys, log) -> int:
    """SLUICE_WORKERS=N > 1: one listening socket, N edge processes serving it
    (edge/worker_set.py); this process watches them and relays its signals."""
    from edge.worker_set import WorkerSet, listen

    def edge_lost(edge_id: str) -> None:
        # The Supervisor passes it on to every Coalescer shard (the current addresses are its).
        from actors.supervisor import SupervisorActor
        from protocols import messages as m
        from protocols import roles
        from protocols.roles import SUPERVISOR_NAME

        supervisor = asys.createActor(SupervisorActor, globalName=SUPERVISOR_NAME)
        asys.tell(supervisor, m.encode(m.MemberLost(roles.EDGE, edge_id)))

    sock = listen(settings.host, settings.port)
    try:
        return WorkerSet(settings, settings.workers, sock, secret, edge_lost).serve()
    finally:
        sock.close()


def _port_free(host: str, port: int) -> bool:
    if port == 0:
        return True
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # SO_REUSEADDR, as the servers use: TIME_WAIT leftovers do not count, listeners do.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
