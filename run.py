"""Start sluice: `python run.py` serves; `python run.py admin ...` talks to a running one.

Order matters. The actor system is started first, from a process with no threads yet
(multiprocTCPBase forks its admin, and forking a threaded process is unsafe), with every
socket bound to SLUICE_HOST. Then the simulated provider (when no real provider is
configured), then uvicorn with the edge, in this process. SIGTERM drains first (/readyz
503, new requests 503, open streams finish for up to SLUICE_DRAIN_S: edge/server.py);
SIGINT does not wait. Then open streams get a terminal event, uvicorn stops, the actor
system shuts down, the simulated provider is stopped; nothing is left running. If this
process dies without that, the Supervisor notices within a second and shuts the actor
system down itself. Every process logs in the SLUICE_LOG_FORMAT (protocols/logfmt.py).
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
        _check_keys_file(settings["SLUICE_API_KEYS_FILE"])
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


def _check_keys_file(path: str | None) -> None:
    """A bad client keys file stops the start (exit 2) before anything runs."""
    if path is None:
        return
    from edge.api_keys import KeysFileError, read_keys_file

    try:
        read_keys_file(path)
    except KeysFileError as exc:
        raise config.ConfigError(f"SLUICE_API_KEYS_FILE: {exc}") from None


def serve(settings: dict) -> int:
    from protocols import logfmt

    logfmt.configure(settings)  # hpack's header dumps (API keys) are never logged, at any level
    log = logging.getLogger("sluice")
    host, port = settings["SLUICE_HOST"], settings["SLUICE_PORT"]
    for name in ("SLUICE_PORT", "SLUICE_ACTOR_PORT"):
        if not _port_free(host, settings[name]):
            log.error("sluice: %s=%s is already in use on %s", name, settings[name], host)
            return 2
    if settings["SLUICE_API_KEYS_FILE"] is None:
        log.warning("no SLUICE_API_KEYS_FILE: every client is allowed")
    else:
        log.info("client API keys from %s; coalescing scope: %s", settings["SLUICE_API_KEYS_FILE"], settings["COALESCE_SCOPE"])
    for name, provider in settings["providers"].items():
        if name != "simulated" and provider["api_key"] is None and provider["adapter"] != "ollama":
            log.warning("provider %s has no API key (%s_API_KEY): its calls will fail upstream", name, provider["account"])

    from actors import secret, system
    from actors.supervisor import SUPERVISOR_NAME, SupervisorActor
    from protocols import auth
    from protocols import messages as m

    if not secret.installed():  # until the secret is configured/loaded (issue 10 transport)
        secret.install(auth.new_secret())
    asys, group = system.start(host, settings["SLUICE_ACTOR_PORT"], logfmt.actor_log_defs(settings))
    settings = {**settings, "parent_pid": os.getpid(), "actor_group": group}
    sim = None
    try:
        sim = _start_simulated_provider(settings, log)
        supervisor = asys.createActor(SupervisorActor, globalName=SUPERVISOR_NAME)
        asys.tell(supervisor, m.encode(m.Wire("supervisor", {}, settings)))
        return _serve_http(settings, log)
    finally:
        system.stop(asys, group)
        if sim is not None:
            from sim.provider import stop_subprocess

            stop_subprocess(sim)
        log.info("sluice stopped")


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

    from edge.http_limits import ConnectionLimits, protocol_class
    from edge.routes import build_app
    from edge.server import DrainingServer

    app, edge = build_app(settings)
    limits = ConnectionLimits(settings["SLUICE_HEADER_TIMEOUT_S"], settings["SLUICE_MAX_CONNECTIONS_PER_CLIENT"])
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=settings["SLUICE_HOST"],
            port=settings["SLUICE_PORT"],
            log_level=settings["SLUICE_LOG_LEVEL"].lower(),
            log_config=None,  # uvicorn's lines go to our handler, in our format
            lifespan="on",
            timeout_graceful_shutdown=10,  # after the drain: streams have had their terminal event
            access_log=False,  # ours is edge/access_log.py
            http=protocol_class(limits),  # header deadline, per-address cap: edge/http_limits.py
        ),
        edge,
        settings["SLUICE_DRAIN_S"],
    )
    log.info("sluice listening on http://%s:%d", settings["SLUICE_HOST"], settings["SLUICE_PORT"])
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # a Ctrl-C before uvicorn took the signals over
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
