"""`python run.py admin <command> ...`: operator commands from a shell.

This module owns the command line: turning `key=value` words into typed arguments,
joining the running actor system (SLUICE_ACTOR_HOST, SLUICE_ACTOR_PORT) as a client,
proving the operator's credentials, printing the answer as JSON, and exit codes. The commands themselves (what each one validates and
which actors it goes to) are edge/admin_routes.py's `COMMANDS`, shared with the HTTP routes.

Credentials, the same as the HTTP admin routes ask for: `SLUICE_ADMIN_TOKEN` in the
environment, checked by the Supervisor (`AdminAuth`, constant-time) before any command
runs; refused when it is missing or wrong, or when the gateway has no admin token. To
join at all, the CLI needs the cluster secret: `SLUICE_CLUSTER_SECRET`, or the gateway's
secret file (SLUICE_SECRET_FILE, default next to SLUICE_DB), refused when others may
read it (docs/security.md).

Exit codes: 0 done; 1 the gateway is not there or did not answer; 2 invalid command or
values, or refused credentials (nothing was changed). Errors print `{"ok": false, "error": {...}}` on stdout and a
one-line reason on stderr.

The CLI never starts an actor system of its own: it checks that something listens on the
actor port first (Thespian would otherwise start a fresh, empty one on it), and it never
calls `shutdown()` (that would stop the gateway's).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading

from protocols import config

JOIN_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 15.0

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class UsageError(Exception):
    pass


def _value(key: str, text: str, kinds: dict):
    """A `key=value` word's value, typed as the actor expects (`kinds`: key -> type)."""
    kind = kinds.get(key)
    lowered = text.strip().lower()
    if kind is bool:
        if lowered in TRUE_WORDS:
            return True
        if lowered in FALSE_WORDS:
            return False
        raise UsageError(f"{key} must be true or false (or 1/0, on/off), got {text!r}")
    if lowered in ("none", "null", "off", ""):
        return None  # e.g. rpm=off switches the per-minute cap off
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text  # left to the command's validation, which names the key


def _pairs(words: list[str], kinds: dict) -> dict:
    out = {}
    for word in words:
        key, sep, text = word.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {word!r}")
        key = key.strip().lower()
        out[key] = _value(key, text, kinds)
    return out


def parse_args(name: str, words: list[str]) -> dict:
    """The CLI words after the command name -> the command's args dict."""
    from protocols.settings import ALERT_DEFAULTS as THRESHOLDS
    from protocols.settings import FLAG_TYPES, SETTING_TYPES

    if name == "show":
        if len(words) > 1:
            raise UsageError("show takes at most one role (all, pacer, coalescer, pacer:<account>, pool, ...)")
        return {"role": words[0] if words else "all"}
    if name == "set-pacer":
        if not words:
            raise UsageError("set-pacer needs an account, e.g. set-pacer perplexity rps=1 burst=2 concurrency=3")
        return {"account": words[0], "settings": _pairs(words[1:], SETTING_TYPES)}
    if name == "set-flags":
        return {"flags": _pairs(words, FLAG_TYPES)}
    if name == "set-thresholds":
        return {"thresholds": _pairs(words, {k: type(v) for k, v in THRESHOLDS.items()})}
    if name == "drain":
        if len(words) != 1 or words[0].lower() not in TRUE_WORDS + FALSE_WORDS:
            raise UsageError("drain takes one word: on or off")
        return {"on": words[0].lower() in TRUE_WORDS}
    if words:
        raise UsageError(f"{name} takes no arguments")
    return {}


def usage() -> str:
    from edge.admin_routes import COMMANDS

    lines = ["usage: python run.py admin <command> [args]", "", "commands:"]
    lines += [f"  {c.usage:<40} {c.help}" for c in COMMANDS.values()]
    lines += [
        "",
        "Talks to the actor system at SLUICE_ACTOR_HOST:SLUICE_ACTOR_PORT (default 127.0.0.1:19500).",
        "Needs SLUICE_ADMIN_TOKEN (the gateway's admin token) and the cluster secret (SLUICE_CLUSTER_SECRET,",
        "or the gateway's secret file: SLUICE_SECRET_FILE, default cluster-<port>.secret next to SLUICE_DB).",
    ]
    return "\n".join(lines)


def _fail(code: str, message: str, exit_code: int) -> int:
    print(json.dumps({"ok": False, "error": {"code": code, "message": message}}, indent=2))
    print(f"sluice admin: {message}", file=sys.stderr)
    return exit_code


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _join(port: int):
    """Join the running actor system; None when it does not answer in time. Thespian takes
    ~15 s to give up on a port where something else listens, so the join runs in a daemon
    thread we stop waiting for."""
    from edge.bridge import ActorBridge

    bridge = ActorBridge(port, workers=8)
    outcome: list = []

    def join():
        try:
            bridge.start()
            outcome.append(None)
        except Exception as exc:  # InvalidActorAddress and friends: not a sluice actor system
            outcome.append(exc)

    thread = threading.Thread(target=join, name="admin-join", daemon=True)
    thread.start()
    thread.join(JOIN_TIMEOUT_S)
    if not outcome or outcome[0] is not None:
        return None
    return bridge


async def _authorized(bridge, token: str, name: str, args: dict) -> dict:
    """The Supervisor checks the token first; the command runs only when it agrees."""
    from edge.admin_routes import AdminError, run_command
    from edge.bridge import BridgeError
    from protocols import messages as m
    from protocols import roles

    try:
        verdict = await bridge.ask(roles.SUPERVISOR, m.AdminAuth(token), timeout=5.0)
    except BridgeError as exc:
        raise AdminError(503, "gateway_unavailable", f"the supervisor did not check the admin token: {exc}") from None
    if not verdict.ok:
        raise AdminError(403, str(verdict.result.get("code", "unauthorized")), verdict.error or "refused")
    return await run_command(bridge, name, args)


def main(argv: list[str]) -> int:
    from edge.admin_routes import COMMANDS, AdminError

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, words = argv[0], argv[1:]
    if name not in COMMANDS:
        return _fail("unknown_command", f"unknown command {name!r} (commands: {', '.join(COMMANDS)}; see --help)", 2)
    try:
        args = parse_args(name, words)
        settings = config.load(os.environ)
    except (UsageError, config.ConfigError) as exc:
        return _fail("invalid_request", f"{name}: {exc}", 2)
    if name == "reload-keys":
        args["path"] = settings.api_keys_file  # the gateway's file: validated here first

    token = settings.admin_token
    if not token:
        return _fail(
            "unauthorized",
            "set SLUICE_ADMIN_TOKEN to the gateway's admin token (the same one the /api/admin routes ask for)",
            2,
        )
    host, port = config.reachable_host(settings.actor_host), settings.actor_port
    if not _listening(host, port):
        return _fail(
            "gateway_not_running",
            f"no gateway is running: nothing listens on the actor port {host}:{port} "
            "(start one with `python run.py`, or set SLUICE_ACTOR_HOST / SLUICE_ACTOR_PORT)",
            1,
        )
    from actors import secret_file, system

    try:
        secret = secret_file.for_client(settings)
    except secret_file.SecretError as exc:
        return _fail("no_cluster_secret", str(exc), 2)
    system.prepare(host, secret)  # our own Thespian sockets: on that host, frames signed
    bridge = _join(port)
    if bridge is None:
        return _fail(
            "gateway_unavailable",
            f"{host}:{port} does not answer as a sluice actor system "
            f"within {JOIN_TIMEOUT_S:g} s (or the cluster secret is not this gateway's)",
            1,
        )
    try:
        out = asyncio.run(asyncio.wait_for(_authorized(bridge, token, name, args), COMMAND_TIMEOUT_S))
    except AdminError as exc:
        return _fail(exc.code, exc.message, 2 if exc.status < 500 else 1)
    except TimeoutError:
        return _fail("gateway_unavailable", f"{name}: no answer within {COMMAND_TIMEOUT_S:g} s", 1)
    finally:
        bridge.close()
    print(json.dumps({"ok": True, **out}, indent=2, default=str))
    return 0
