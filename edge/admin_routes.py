"""Operator commands: one table, two faces (the HTTP routes here, `run.py admin` in
edge/admin_cli.py).

This module owns `COMMANDS`, the table of what an operator can do to the running actors,
and `run_command`, which validates a command's arguments, resolves which actors it goes to
(from the Supervisor's directory), sends each an `Admin` message (`GetState` for show) and
gathers the answers. Validation happens here, with the actors' own validators (the schemas
in protocols/settings.py), before anything is sent, so an invalid command changes no actor
(set-flags goes to every Coalescer shard: half-applied flags would be worse than none). The
actors validate again; that is their contract, not ours to rely on.

HTTP (only when SLUICE_ADMIN_TOKEN is set; otherwise the routes do not exist: 404):

    GET  /api/admin/state[?role=R]      show           every actor's state (or one role)
    POST /api/admin/pacer/{account}     set-pacer      {"rps": 5, "burst": 10, ...}
    POST /api/admin/flags               set-flags      {"coalesce_enabled": false, ...}
    POST /api/admin/drain               drain          {"on": true}
    POST /api/admin/metrics/reset       reset-metrics
    GET  /api/admin/alerts              alerts         thresholds and firing/pending rules
    POST /api/admin/alerts/thresholds   set-thresholds {"ttft_p95_ms": 1200, ...}
    POST /api/admin/keys/reload         reload-keys    re-read SLUICE_API_KEYS_FILE now

Every request needs `Authorization: Bearer <SLUICE_ADMIN_TOKEN>` (401 without, 403 when
wrong). Answers are `{"command", "results": {role: result}}`; errors are
`{"error": {"code", "message"}}` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from dataclasses import asdict, dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import patches
from edge.api_keys import KeysFileError
from edge.body_limits import BodyError, load_json
from edge.bridge import BridgeError
from edge.chat_request import RequestError
from protocols import messages as m
from protocols import roles as role_names
from protocols.config import PROVIDERS
from protocols.settings import CoalescerFlags, PacerSettings, flags_from, settings_from, validate_thresholds

ASK_TIMEOUT_S = 5.0


class AdminError(Exception):
    """A command that cannot run: its HTTP status, a code and a message for the operator."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Command:
    name: str
    usage: str  # the CLI's form of it
    help: str
    # (directory entries, args) -> [(role, message)]; validates, raises AdminError
    plan: Callable[[dict, dict], list[tuple[str, object]]]


# --- planning: which actors get which Admin message ----------------------------------------


def _plan_show(roles: dict, args: dict) -> list:
    wanted = args.get("role") or "all"
    if wanted == "all":
        chosen = sorted(roles)
    else:
        # "pacer" or "coalescer" alone means every actor of that kind
        chosen = sorted(r for r in roles if r == wanted or role_names.kind(r) == wanted)
    if not chosen:
        raise AdminError(404, "unknown_role", f"no actor plays {wanted!r} (roles: {', '.join(sorted(roles))})")
    # GetState, not Admin("show"): every actor's host answers it (even one with no admin
    # commands of its own, like the thread store), and it is what the actors' `show` reports.
    return [(role, m.GetState()) for role in chosen]


def pacer_role(roles: dict, account: str) -> str:
    """The Pacer role for an account ("perplexity") or a provider name ("perplexity_sonar")."""
    name = str(account).strip()
    try:
        role = role_names.pacer(PROVIDERS.get(name.lower(), name))
    except ValueError:
        role = ""
    if role not in roles:
        known = ", ".join(role_names.pacer_account(r) for r in sorted(roles) if role_names.is_pacer(r))
        raise AdminError(404, "unknown_account", f"no pacer for account {name!r} on this gateway (pacers: {known})")
    return role


def _changes(args: dict, key: str) -> dict:
    changes = args.get(key)
    if not isinstance(changes, dict) or not changes:
        raise AdminError(400, "invalid_request", "nothing to set: give at least one key=value")
    return {str(k).lower(): v for k, v in changes.items()}


def _plan_set_pacer(roles: dict, args: dict) -> list:
    role = pacer_role(roles, args.get("account", ""))
    changes = _changes(args, "settings")
    try:
        settings_from(PacerSettings(), changes)  # the Pacer's own validation, before sending
    except ValueError as exc:
        raise AdminError(422, "invalid_value", str(exc)) from None
    return [(role, m.Admin("set", changes))]


def _plan_set_flags(roles: dict, args: dict) -> list:
    changes = _changes(args, "flags")
    try:
        flags_from(CoalescerFlags(), changes)
    except ValueError as exc:
        raise AdminError(422, "invalid_value", str(exc)) from None
    shards = sorted(r for r in roles if role_names.is_coalescer(r))
    return [(role, m.Admin("set_flags", changes)) for role in shards]


def _plan_drain(roles: dict, args: dict) -> list:
    on = args.get("on")
    if not isinstance(on, bool):
        raise AdminError(422, "invalid_value", f"drain: 'on' must be true or false, got {on!r}")
    return [(role_names.SUPERVISOR, m.Admin("drain", {"on": on}))]


def _plan_reload_keys(roles: dict, args: dict) -> list:
    """Validate the keys file here (a bad one: 422 with the reason, nothing sent, the old
    keys stay); then the Supervisor counts the reload and every edge re-reads its file
    within a second (the HTTP route's own edge at once)."""
    from edge.api_keys import read_keys_file

    path = args.get("path")
    if not path:
        raise AdminError(409, "keys_off", "client API keys are off: SLUICE_API_KEYS_FILE is not set")
    try:
        read_keys_file(path)
    except KeysFileError as exc:
        raise AdminError(422, "invalid_keys_file", f"the previous keys stay in force: {exc}") from None
    return [(role_names.SUPERVISOR, m.Admin("reload_keys", {}))]


def _plan_reset_metrics(roles: dict, args: dict) -> list:
    return [(role_names.METRICS, m.Admin("reset", {}))]


def _plan_alerts(roles: dict, args: dict) -> list:
    return [(role_names.METRICS, m.Admin("alerts", {}))]


def _plan_set_thresholds(roles: dict, args: dict) -> list:
    changes = _changes(args, "thresholds")
    try:
        validate_thresholds(changes)
    except ValueError as exc:
        raise AdminError(422, "invalid_value", str(exc)) from None
    return [(role_names.METRICS, m.Admin("set_thresholds", changes))]


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "show",
            "show [all|ROLE|pacer|coalescer]",
            "each actor's state (pacer settings/tokens/queue, coalescer in-flight keys, pool streams, metrics summary)",
            _plan_show,
        ),
        Command(
            "set-pacer",
            "set-pacer ACCOUNT key=value ...",
            "change a Pacer live: rps burst concurrency rpm max_queue max_wait_s",
            _plan_set_pacer,
        ),
        Command(
            "set-flags",
            "set-flags key=value ...",
            "change every Coalescer shard live: coalesce_enabled stream_fanout_enabled error_ttl_s",
            _plan_set_flags,
        ),
        Command("drain", "drain on|off", "on: new chat requests get 503, open streams finish", _plan_drain),
        Command(
            "reload-keys",
            "reload-keys",
            "re-read SLUICE_API_KEYS_FILE (client API keys) now; a bad file is refused and the previous keys stay",
            _plan_reload_keys,
        ),
        Command(
            "reset-metrics", "reset-metrics", "forget the windowed samples (counters are kept)", _plan_reset_metrics
        ),
        Command("alerts", "alerts", "alert thresholds and firing/pending rules", _plan_alerts),
        Command(
            "set-thresholds",
            "set-thresholds key=value ...",
            "change alert thresholds live (see protocols/settings.py, actors/alerts.py)",
            _plan_set_thresholds,
        ),
    )
}


async def run_command(bridge, name: str, args: dict) -> dict:
    """Validate, send, gather: {"command", "results": {role: result}}; raises AdminError."""
    command = COMMANDS.get(name)
    if command is None:
        raise AdminError(404, "unknown_command", f"unknown admin command {name!r} (commands: {', '.join(COMMANDS)})")
    try:
        directory = await bridge.refresh_directory(force=True)
    except BridgeError as exc:
        raise AdminError(503, "gateway_unavailable", f"the supervisor did not answer: {exc}") from None
    plan = command.plan(directory.entries, args)
    replies = await asyncio.gather(
        *(bridge.ask(role, msg, timeout=ASK_TIMEOUT_S) for role, msg in plan), return_exceptions=True
    )
    results, failures = {}, []
    for (role, _), reply in zip(plan, replies):
        if isinstance(reply, BridgeError):
            failures.append((503, "actor_unavailable", f"{role}: {reply}"))
        elif isinstance(reply, BaseException):
            raise reply
        elif isinstance(reply, m.State):
            results[role] = reply.state
        elif not isinstance(reply, m.AdminResult):
            failures.append((502, "bad_reply", f"{role} answered {type(reply).__name__}"))
        elif not reply.ok:
            failures.append((422, "rejected", f"{role}: {reply.error}"))
        else:
            results[role] = reply.result
    if failures:
        status, code, message = failures[0]
        raise AdminError(status, code, "; ".join(f[2] for f in failures))
    return {"command": name, "results": results}


# --- HTTP ---------------------------------------------------------------------------------------


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class AdminRoutes:
    def __init__(self, edge):
        self.edge = edge
        self.token = edge.settings.admin_token.encode()

    def _denied(self, request: Request) -> JSONResponse | None:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return _error(
                401,
                "unauthorized",
                "admin routes need 'Authorization: Bearer <SLUICE_ADMIN_TOKEN>'",
                {"WWW-Authenticate": 'Bearer realm="sluice-admin"'},
            )
        if not hmac.compare_digest(presented.strip().encode(), self.token):
            return _error(403, "forbidden", "the admin token is wrong")
        return None

    async def _run(self, name: str, args: dict, extra: Callable[[], dict] | None = None) -> JSONResponse:
        try:
            out = await run_command(self.edge.bridge, name, args)
        except AdminError as exc:
            return _error(exc.status, exc.code, exc.message)
        if name == "drain":
            # this edge stops taking chats at once; the others see it within a second
            self.edge.set_draining(args["on"])
        if name == "reload-keys":
            try:  # this edge at once; the others when they see the Supervisor's count
                self.edge.keys.reload()
            except KeysFileError as exc:  # the file changed again since it was checked
                return _error(422, "invalid_keys_file", f"the previous keys stay in force: {exc}")
            return JSONResponse({**out, "keys": self.edge.keys.state()})
        return JSONResponse({**out, **(extra() if extra else {})})

    async def body(self, request: Request) -> dict:
        try:  # the edge's reader: the same size limit and SLUICE_BODY_TIMEOUT_S (a 408)
            raw = await self.edge.read_body(request)
        except RequestError as exc:
            raise AdminError(exc.status, exc.code, exc.message) from None
        limit = self.edge.settings.max_body_bytes
        if len(raw) > limit:
            raise AdminError(413, "body_too_large", f"request body is {len(raw)} bytes; the limit is {limit}")
        if not raw.strip():
            return {}
        try:
            data = load_json(raw)  # the same limits as every other body
        except BodyError as exc:
            raise AdminError(
                exc.status, "invalid_json" if exc.code == "malformed_json" else exc.code, exc.message
            ) from None
        if not isinstance(data, dict):
            raise AdminError(400, "invalid_request", "the body must be a JSON object")
        return data

    def handler(self, name: str, args_from: Callable | None = None, extra: Callable[[], dict] | None = None):
        async def handle(request: Request):
            denied = self._denied(request)
            if denied is not None:
                return denied
            try:
                args = await args_from(request) if args_from else {}
            except AdminError as exc:
                return _error(exc.status, exc.code, exc.message)
            return await self._run(name, args, extra)

        return handle

    def gateway_info(self) -> dict:
        """What this edge was started with: the sign-off scripts find the default
        provider's account and its upstream's base URL here."""
        s = self.edge.settings
        return {
            "default_provider": s.provider,
            # base_url: the sign-off record names the upstream, and refuses a loopback or
            # simulated one outside a rehearsal (scripts/ttft_suite.py)
            "providers": {
                name: {"account": p.account, "model": p.model, "base_url": p.base_url or None}
                for name, p in s.providers.items()
            },
            "configured_pacers": {acct.lower(): asdict(v) for acct, v in s.accounts.items()},
            "draining": self.edge.draining,
            "patches": patches.installed(),  # this edge process's; the Pool's are in its own state
        }


def routes(edge) -> list[Route]:
    if not edge.settings.admin_token:
        return []  # no token, no admin surface: every /api/admin path is a plain 404
    admin = AdminRoutes(edge)

    async def pacer_args(request: Request) -> dict:
        return {"account": request.path_params["account"], "settings": await admin.body(request)}

    async def flags_args(request: Request) -> dict:
        return {"flags": await admin.body(request)}

    async def drain_args(request: Request) -> dict:
        return {"on": (await admin.body(request)).get("on")}

    async def show_args(request: Request) -> dict:
        return {"role": request.query_params.get("role", "all")}

    async def keys_args(request: Request) -> dict:
        return {"path": edge.settings.api_keys_file}

    async def thresholds_args(request: Request) -> dict:
        return {"thresholds": await admin.body(request)}

    return [
        Route(
            "/api/admin/state",
            admin.handler("show", show_args, lambda: {"gateway": admin.gateway_info()}),
            methods=["GET"],
        ),
        Route("/api/admin/pacer/{account}", admin.handler("set-pacer", pacer_args), methods=["POST"]),
        Route("/api/admin/flags", admin.handler("set-flags", flags_args), methods=["POST"]),
        Route("/api/admin/drain", admin.handler("drain", drain_args), methods=["POST"]),
        Route("/api/admin/metrics/reset", admin.handler("reset-metrics"), methods=["POST"]),
        Route("/api/admin/keys/reload", admin.handler("reload-keys", keys_args), methods=["POST"]),
        Route("/api/admin/alerts", admin.handler("alerts"), methods=["GET"]),
        Route("/api/admin/alerts/thresholds", admin.handler("set-thresholds", thresholds_args), methods=["POST"]),
    ]
