"""The sign-off scripts' HTTP client of a running gateway (stdlib + httpcore only).

This module owns `Gateway` (JSON calls, the admin routes with the admin token, clear
errors for "no gateway" and "token refused") and `SuiteError`, the one way the sign-off
says "I cannot run" (exit status 2). scripts/signoff_settings.py and scripts/ttft_suite.py
both use it.
"""

from __future__ import annotations

import json
import os
import sys

import httpcore


class SuiteError(Exception):
    """The suite cannot run (exit 2); the message says why and what to do."""


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise SuiteError(f"{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise SuiteError(f"{name}={raw!r} must be >= 1")
    return value


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise SuiteError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise SuiteError(f"{name}={raw!r} must be > 0")
    return value


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def timeouts(seconds: float) -> dict:
    return {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds}


def parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return {}


class Gateway:
    """A running gateway: its URL, its admin token, and (optional) a client key for the
    chat routes (SLUICE_CLIENT_KEY, sent as `Authorization: Bearer` when set)."""

    def __init__(self, url: str, token: str | None, client_key: str | None = None):
        self.url, self.token, self.client_key = url.rstrip("/"), token, client_key
        self.pool = httpcore.ConnectionPool()  # thread-safe: shared by the run's workers

    def call(
        self, method: str, path: str, body=None, auth: bool = False, timeout: float = 10.0, base: str | None = None
    ):
        headers = [(b"accept", b"application/json")]
        content = None
        if body is not None:
            content = json.dumps(body).encode()
            headers.append((b"content-type", b"application/json"))
        if auth:
            headers.append((b"authorization", f"Bearer {self.token}".encode()))
        url = (base or self.url).rstrip("/") + path
        try:
            r = self.pool.request(
                method, url, headers=headers, content=content, extensions={"timeout": timeouts(timeout)}
            )
        except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
            if base is not None:
                raise SuiteError(f"nothing answers at {base} ({exc or 'connection refused'})") from None
            raise SuiteError(
                f"no gateway at {self.url} ({exc or 'connection refused'}): start it "
                f"(`python run.py`) or pass its URL (argument or SLUICE_URL)"
            ) from None
        except httpcore.TimeoutException:
            raise SuiteError(f"{method} {url}: no answer within {timeout:g} s") from None
        except (httpcore.NetworkError, httpcore.RemoteProtocolError) as exc:
            raise SuiteError(f"{method} {url}: {exc}") from None
        return r.status, r.content

    def admin(self, method: str, path: str, body=None) -> dict:
        if not self.token:
            raise SuiteError("SLUICE_ADMIN_TOKEN is not set: the admin routes need the gateway's token")
        status, raw = self.call(method, "/api/admin" + path, body, auth=True)
        if status == 404 and b"not_found" in raw:
            raise SuiteError(f"{self.url} has no admin routes: start the gateway with SLUICE_ADMIN_TOKEN set")
        if status in (401, 403):
            raise SuiteError(f"the gateway refused SLUICE_ADMIN_TOKEN ({status}): it is not the gateway's token")
        data = parse_json(raw)
        if status != 200:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            raise SuiteError(f"admin {path}: {status} {error.get('code', '')}: {error.get('message', raw[:200])}")
        return data

    def state(self, role: str | None = None) -> dict:
        return self.admin("GET", "/state" + (f"?role={role}" if role else ""))

    def thresholds(self) -> dict:
        return self.admin("GET", "/alerts")["results"]["metrics"]["thresholds"]

    def performance(self, last_n: int) -> dict:
        status, raw = self.call("GET", f"/api/metrics/performance?last_n={last_n}")
        if status != 200:
            raise SuiteError(f"GET /api/metrics/performance answered {status}")
        return parse_json(raw)

    def chat_headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream")]
        if self.client_key:
            headers.append((b"authorization", f"Bearer {self.client_key}".encode()))
        return headers
