"""Start sluice: `python run.py` serves; `python run.py admin ...` talks to a running one.

Order matters. The actor system is started first, from a process with no threads yet
(multiprocTCPBase forks its admin, and forking a threaded process is unsafe), with every
socket bound to SLUICE_HOST. Then the simulated provider (when no real provider is
configured), then uvicorn with the edge, in this process. SIGINT/SIGTERM: open streams get
a terminal event, uvicorn stops, the actor system shuts down, the simulated provider is
stopped; nothing is left running. If this process dies without that, the orphan
watchdog (a process of its own) notices within a second and shuts the actor system down.
While serving, a keeper thread replaces a dead Supervisor (and a dead watchdog).
"""
from __future__ import annotations

import logging
import os
import socket
import sys

from protocols import config


def main(argv: list[str]) -> int:
    if argv[:1] == ["admin"]:
        from edge.admin_cli import main as admin_main

        return admin_main(argv[1:])
    try:
        settings = config.load(os.environ)
        _check_alert_thresholds(settings["alert_thresholds"])
    except config.ConfigError as exc:
        print(f"sluice: configuration error: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


def _check_alert_thresholds(thresholds: dict) -> None:
    from actors.alerts import validate_thresholds

    try:
        validate_thresholds(thresholds)
    except ValueError as exc:
        raise config.ConfigError(f"{config.ALERT_PREFIX}*: {exc}") from None


def serve(settings: dict) -> int:
    logging.basicConfig(
        level=settings["SLUICE_LOG_LEVEL"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # hpack logs every header it encodes at DEBUG, API keys included: never below INFO.
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    log = logging.getLogger("sluice")
    host, port = settings["SLUICE_HOST"], settings["SLUICE_PORT"]
    for name in ("SLUICE_PORT", "SLUICE_ACTOR_PORT"):
        if not _port_free(host, settings[name]):
            print(f"sluice: {name}={settings[name]} is already in use on {host}", file=sys.stderr)
            return 2
    for name, provider in settings["providers"].items():
        if name != "simulated" and provider["api_key"] is None and provider["adapter"] != "ollama":
            log.warning("provider %s has no API key (%s_API_KEY): its calls will fail upstream", name, provider["account"])

    from actors import system
    from actors.supervisor import SUPERVISOR_NAME, SupervisorActor
    from protocols import messages as m

    asys, group = system.start(host, settings["SLUICE_ACTOR_PORT"])
    settings = {**settings, "parent_pid": os.getpid(), "actor_group": group}
    sim = keeper = None
    watchdog = _Watchdog(host, settings["SLUICE_ACTOR_PORT"], group)
    try:
        sim = _start_simulated_provider(settings, log)
        supervisor = asys.createActor(SupervisorActor, globalName=SUPERVISOR_NAME)
        asys.tell(supervisor, m.encode(m.Wire("supervisor", {}, settings)))
        keeper = _start_keeper(asys, settings, watchdog)
        return _serve_http(settings, log)
    finally:
        if keeper is not None:
            keeper.stop()
        watchdog.stop()
        system.stop(asys, group)
        if sim is not None:
            from sim.provider import stop_subprocess

            stop_subprocess(sim)
        log.info("sluice stopped")


class _Watchdog:
    """The orphan watchdog process (actors/system.py `watch`), restarted if it dies."""

    def __init__(self, host: str, port: int, group: int | None):
        self.args, self.proc = (os.getpid(), host, port, group), None

    def ensure(self) -> None:
        if self.args[3] is not None and (self.proc is None or self.proc.poll() is not None):
            from actors.system import start_watchdog

            self.proc = start_watchdog(*self.args)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


def _start_keeper(asys, settings: dict, watchdog: _Watchdog):
    from actors.keeper import SupervisorKeeper

    watchdog.ensure()
    return SupervisorKeeper(asys, settings, watchdog.ensure).start()


def _start_simulated_provider(settings: dict, log):
    simulated = settings["providers"].get("simulated")
    if simulated is None or simulated["base_url"]:
        return None
    from sim.provider import start_subprocess

    proc, port = start_subprocess(port=settings["SLUICE_SIM_PORT"], host=settings["SLUICE_HOST"])
    simulated["base_url"] = f"http://{settings['SLUICE_HOST']}:{port}"
    log.info("simulated provider on %s", simulated["base_url"])
    return proc


def _serve_http(settings: dict, log) -> int:
    import uvicorn

    from edge.routes import build_app

    app, edge = build_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            edge.begin_shutdown()  # streams end with a terminal event before uvicorn waits on them
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            host=settings["SLUICE_HOST"],
            port=settings["SLUICE_PORT"],
            log_level=settings["SLUICE_LOG_LEVEL"].lower(),
            lifespan="on",
            timeout_graceful_shutdown=10,
            access_log=False,
        )
    )
    log.info("sluice listening on http://%s:%d", settings["SLUICE_HOST"], settings["SLUICE_PORT"])
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled; the shutdown has already happened
    return 0 if server.started else 1


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
