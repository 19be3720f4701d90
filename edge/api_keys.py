"""Client API keys: who may call the gateway, which models, and how much.

This module owns the key table read from `SLUICE_API_KEYS_FILE` and each key's usage on
this edge process: requests in the last minute, tokens in the last minute, open streams,
and cumulative counters for `/metrics`. The routes only call it (edge/app.py
`Edge.authenticate` and `Edge.admit`); nothing here knows about HTTP beyond the two
header names a key may arrive in.

The file (hashes only, never the keys themselves):

    {"keys": [{"id": "team-a", "sha256": "<hex sha256 of the key>",
               "rpm": 60, "tpm": 100000, "concurrency": 10, "models": ["*"]}]}

`rpm`, `tpm` and `concurrency` are optional (absent or null: no limit); `models` is a list
of glob patterns (fnmatch: `*`, `?`, `[...]`) matched against "provider/model" and, for a
pattern without "/", against the bare model name too; absent means `["*"]`. Unknown
fields are refused, so a typo ("rmp") is an error rather than a limit silently missing.

Windows are sliding over the last 60 s: a request is counted when it is admitted; tokens
are charged when its stream ends (the provider's usage when it reported one, else the
estimate of `stream_tokens`). tpm is checked before admitting: a key already at or over
its budget waits until enough of the last minute's tokens age out. The clock is injected
(monotonic seconds), so the limits are unit-tested without waiting.

State is per process. When several edge processes serve the gateway (SLUICE_WORKERS > 1,
or several hosts: docs/scale-out.md) the Metrics actor hosts an `ApiKeys` of its own
that does the counting for all of them (actors/key_limits.py), with no file: each edge
authenticates here and sends the key's entry (`ClientKey.to_wire`) with every ask.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from protocols import events as ev

log = logging.getLogger("sluice.edge.keys")

WINDOW_S = 60.0
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text with OpenAI's tokenizers
KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")  # also a Prometheus label value
HEX_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
FIELDS = ("id", "sha256", "rpm", "tpm", "concurrency", "models")


class KeysFileError(ValueError):
    """The keys file cannot be used; the message says where and why (never a key)."""


@dataclass(frozen=True)
class ClientKey:
    id: str
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    models: tuple[str, ...] = ("*",)

    def to_wire(self) -> dict:
        """The key's limits and models, as `KeyAdmit.key` carries them (no hash)."""
        return {"rpm": self.rpm, "tpm": self.tpm, "concurrency": self.concurrency, "models": list(self.models)}

    @classmethod
    def from_wire(cls, key_id: str, raw: object) -> ClientKey:
        """The inverse of `to_wire`, checked as the file is (KeysFileError names the problem)."""
        where = f"key {key_id!r}"
        if not isinstance(key_id, str) or not KEY_ID.match(key_id):
            raise KeysFileError("a key id must be 1-64 characters of letters, digits, '.', '_', ':' or '-'")
        if not isinstance(raw, dict) or set(raw) - {"rpm", "tpm", "concurrency", "models"}:
            raise KeysFileError(f"{where}: expected {{rpm, tpm, concurrency, models}}")
        models = raw.get("models", ["*"])
        if not isinstance(models, list) or not all(isinstance(p, str) and p for p in models):
            raise KeysFileError(f"{where}: 'models' must be a list of non-empty glob patterns")
        limits = (_limit(raw, name, where) for name in ("rpm", "tpm", "concurrency"))
        return cls(key_id, *limits, tuple(models))

    def allows(self, provider: str, model: str) -> bool:
        qualified = f"{provider}/{model}"
        for pattern in self.models:
            if fnmatch.fnmatchcase(qualified, pattern):
                return True
            if "/" not in pattern and fnmatch.fnmatchcase(model, pattern):
                return True
        return False


@dataclass(frozen=True)
class Denial:
    """A refused request: HTTP status, OpenAI error type and code, message, Retry-After."""

    status: int
    type: str
    code: str
    message: str
    retry_after_s: float | None = None


# --- the file -------------------------------------------------------------------------------


# With several edge processes every ask carries the key's limits to the Metrics actor in
# msgpack, whose integers stop at 64 bits: a larger limit loaded fine and then made every
# request of that key a 503 "retry", for ever and with nothing in the log.
LARGEST_LIMIT = 2**63 - 1


def _limit(entry: dict, name: str, where: str) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KeysFileError(f"{where}: {name!r} must be a positive integer or null")
    if value > LARGEST_LIMIT:
        raise KeysFileError(f"{where}: {name!r} must be at most {LARGEST_LIMIT} (null: no limit)")
    return value


def parse_keys(text: str | bytes) -> dict[str, ClientKey]:
    """The key table, by lower-case hex digest; KeysFileError names the first problem."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise KeysFileError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeysFileError('expected an object {"keys": [...]}')
    table: dict[str, ClientKey] = {}
    ids: set[str] = set()
    for i, entry in enumerate(data["keys"]):
        where = f"keys[{i}]"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: must be an object")
        key_id = entry.get("id")
        if not isinstance(key_id, str) or not KEY_ID.match(key_id):
            raise KeysFileError(f"{where}: 'id' must be 1-64 characters of letters, digits, '.', '_', ':' or '-'")
        where = f"{where} ({key_id!r})"
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            raise KeysFileError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
        if key_id in ids:
            raise KeysFileError(f"{where}: duplicate id")
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not HEX_SHA256.match(digest):
            raise KeysFileError(f"{where}: 'sha256' must be the 64 hex digits of the key's SHA-256")
        digest = digest.lower()
        if digest in table:
            raise KeysFileError(f"{where}: the same key hash as {table[digest].id!r}")
        models = entry.get("models", ["*"])
        if not isinstance(models, list) or not all(isinstance(p, str) and p for p in models):
            raise KeysFileError(f"{where}: 'models' must be a list of non-empty glob patterns")
        ids.add(key_id)
        table[digest] = ClientKey(
            key_id,
            _limit(entry, "rpm", where),
            _limit(entry, "tpm", where),
            _limit(entry, "concurrency", where),
            tuple(models),
        )
    return table


def read_keys_file(path: str) -> dict[str, ClientKey]:
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise KeysFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return parse_keys(text)
    except KeysFileError as exc:
        raise KeysFileError(f"{path}: {exc}") from None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def presented_key(headers) -> str | None:
    """The key a request carries: `Authorization: Bearer <key>`, else `x-api-key: <key>`."""
    return _bearer(headers.get("authorization") or "") or (headers.get("x-api-key") or "").strip() or None


def _bearer(value: str) -> str | None:
    scheme, _, key = value.strip().partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


# The headers that carry a client key (presented_key): each holds one key.
CREDENTIAL_HEADERS = ("authorization", "x-api-key")


def conflicting_credentials(headers) -> str | None:
    """Why a request's key is ambiguous (`headers`: Starlette's, which keeps repeats), or
    None: two different values of one credential header. sluice would read the first; a
    proxy in front may have checked the last, so which key is billed is not guessed. The
    keys are compared, not the raw values: `Bearer k` and `bearer  k` are one key."""
    for name in CREDENTIAL_HEADERS:
        values = headers.getlist(name)
        keys = {_bearer(v) or v.strip() for v in values} if name == "authorization" else {v.strip() for v in values}
        if len(keys) > 1:
            return f"more than one {name} header, with different values: send one key"
    return None


# --- tokens ---------------------------------------------------------------------------------


def stream_tokens(body: dict, events: list[dict]) -> int:
    """Tokens to charge for one request: the provider's usage (total, else prompt +
    completion) when the stream carried one; otherwise an estimate of one token per
    CHARS_PER_TOKEN characters of the prompt's messages and of the text delivered."""
    for event in reversed(events):
        usage = event.get("usage") if event.get("type") in (ev.USAGE, ev.DONE) else None
        if isinstance(usage, dict):
            total = usage.get("total_tokens")
            if not isinstance(total, int):
                parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
                total = sum(p for p in parts if isinstance(p, int)) if any(isinstance(p, int) for p in parts) else None
            if isinstance(total, int) and total >= 0:
                return total
    chars = sum(len(str(msg.get("content") or "")) for msg in body.get("messages") or [] if isinstance(msg, dict))
    chars += sum(len(e.get("delta") or "") for e in events if e.get("type") == ev.DELTA)
    return math.ceil(chars / CHARS_PER_TOKEN)


# --- the table and the limits -----------------------------------------------------------------


@dataclass
class _Usage:
    """One key's usage on this edge: the last minute's admissions and charges, open streams."""

    admitted: deque = field(default_factory=deque)  # admission times
    charged: deque = field(default_factory=deque)  # (time, tokens)
    charged_sum: int = 0
    open: int = 0
    outcomes: dict = field(default_factory=dict)  # outcome -> requests, cumulative
    tokens_total: int = 0

    def expire(self, now: float) -> None:
        while self.admitted and self.admitted[0] <= now - WINDOW_S:
            self.admitted.popleft()
        while self.charged and self.charged[0][0] <= now - WINDOW_S:
            self.charged_sum -= self.charged.popleft()[1]


UNAUTHORIZED = "invalid_api_key"


class ApiKeys:
    """The key table (re-read when the file changes) and each key's limits.

    With `path` None every client is allowed: authenticate() answers the anonymous key id
    None and admit() never refuses. With `counting` (the Metrics actor's count for every
    edge, actors/key_limits.py) there is no file: the table is what `learn` is told."""

    def __init__(
        self,
        path: str | None,
        clock: Callable[[], float] = time.monotonic,
        check_every_s: float = 1.0,
        counting: bool = False,
    ):
        self.path, self.clock, self.check_every_s = path, clock, check_every_s
        self.counting = counting
        self.table: dict[str, ClientKey] = {}
        self.by_id: dict[str, ClientKey] = {}
        self.usage: dict[str, _Usage] = {}
        self.failures = {"missing": 0, "invalid": 0}
        self._signature = None  # (mtime_ns, size, inode) of the file the table came from
        self._bad_signature = None  # a changed file that failed to load: logged once
        self._checked_at = -math.inf
        if path is not None:
            self.reload()  # KeysFileError at start: run.py exits 2

    @property
    def enabled(self) -> bool:
        return self.path is not None or self.counting

    def learn(self, key: ClientKey) -> None:
        """(`counting`) The key as the asking edge's file has it now: its limits apply from
        this request on; its usage so far stays."""
        self.by_id[key.id] = key

    # --- the file -------------------------------------------------------------------------
    def _stat(self):
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def reload(self) -> int:
        """Read the file now; the number of keys. On KeysFileError the old table stays."""
        try:
            signature = self._stat()
        except OSError as exc:
            raise KeysFileError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        table = read_keys_file(self.path)
        self.table = table
        self.by_id = {k.id: k for k in table.values()}
        self._signature, self._bad_signature = signature, None
        self._checked_at = self.clock()
        # Usage of keys still present is kept (a reload does not reset anyone's limits);
        # a removed key's is dropped once its streams are closed (metric series stay bounded).
        self.usage = {kid: u for kid, u in self.usage.items() if kid in self.by_id or u.open}
        return len(table)

    def maybe_reload(self) -> None:
        """Re-read the file if its mtime, size or inode changed; at most once per check_every_s."""
        now = self.clock()
        if self.path is None or now - self._checked_at < self.check_every_s:
            return
        self._checked_at = now
        try:
            signature = self._stat()
        except OSError as exc:
            signature = ("missing", str(exc))
        if signature in (self._signature, self._bad_signature):
            return
        try:
            count = self.reload()
        except KeysFileError as exc:
            self._bad_signature = signature
            log.error("keys file not reloaded, the previous %d keys stay in force: %s", len(self.table), exc)
            return
        log.info("keys file reloaded: %d keys", count)

    # --- requests -------------------------------------------------------------------------
    def authenticate(self, presented: str | None) -> ClientKey | Denial | None:
        """The caller's key; a 401 Denial; None when keys are off (everyone is allowed)."""
        if not self.enabled:
            return None
        self.maybe_reload()
        if presented is None:
            self.failures["missing"] += 1
            return Denial(
                401,
                "invalid_request_error",
                UNAUTHORIZED,
                "no API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
            )
        # A dict lookup by the presented key's SHA-256: the comparison is on a digest the
        # caller cannot steer byte by byte, so its timing tells nothing about a valid key
        # (constant-time enough; no plaintext key is ever held or compared).
        key = self.table.get(hash_key(presented))
        if key is None:
            self.failures["invalid"] += 1
            return Denial(401, "invalid_request_error", UNAUTHORIZED, "the API key is not valid")
        return key

    def allows(self, key_id: str | None, provider: str, model: str) -> bool:
        key = self.by_id.get(key_id) if key_id is not None else None
        return key_id is None or (key is not None and key.allows(provider, model))

    def admit(self, key_id: str | None, provider: str, model: str) -> Denial | None:
        """Check the key's model list and limits; on success the request counts against
        them and holds one stream until `finish`."""
        if key_id is None:
            return None
        key = self.by_id.get(key_id)
        if key is None:  # removed by a reload since it authenticated
            return Denial(401, "invalid_request_error", UNAUTHORIZED, "the API key is not valid")
        now = self.clock()
        usage = self.usage.setdefault(key_id, _Usage())
        usage.expire(now)
        if not key.allows(provider, model):
            self._count(usage, "forbidden")
            return Denial(
                403,
                "invalid_request_error",
                "model_not_allowed",
                f"this API key may not use model '{provider}/{model}'",
            )
        denial = self._over_limit(key, usage, now)
        if denial is not None:
            self._count(usage, "limited")
            return denial
        usage.admitted.append(now)
        usage.open += 1
        return None

    def _over_limit(self, key: ClientKey, usage: _Usage, now: float) -> Denial | None:
        def limited(what: str, retry_after_s: float) -> Denial:
            wait = max(1, math.ceil(retry_after_s))
            return Denial(
                429,
                "rate_limit_error",
                "rate_limit_exceeded",
                f"API key {key.id!r} is over its {what}; retry in {wait} s",
                wait,
            )

        if key.concurrency is not None and usage.open >= key.concurrency:
            return limited(f"{key.concurrency} concurrent streams", 1)
        if key.rpm is not None and len(usage.admitted) >= key.rpm:
            # the oldest admission that must age out before one more fits
            oldest = usage.admitted[len(usage.admitted) - key.rpm]
            return limited(f"{key.rpm} requests/minute", oldest + WINDOW_S - now)
        if key.tpm is not None and usage.charged_sum >= key.tpm:
            left = usage.charged_sum
            for at, tokens in usage.charged:
                left -= tokens
                if left < key.tpm:
                    return limited(f"{key.tpm} tokens/minute", at + WINDOW_S - now)
        return None

    def finish(self, key_id: str | None, outcome: str, tokens: int) -> None:
        """An admitted request ended (or was refused after `admit`): its stream is released
        and its tokens charged."""
        if key_id is None:
            return
        usage = self.usage.get(key_id)
        if usage is None:
            return
        now = self.clock()
        usage.open = max(0, usage.open - 1)
        if tokens > 0:
            usage.charged.append((now, tokens))
            usage.charged_sum += tokens
            usage.tokens_total += tokens
        self._count(usage, outcome)
        usage.expire(now)

    @staticmethod
    def _count(usage: _Usage, outcome: str) -> None:
        usage.outcomes[outcome] = usage.outcomes.get(outcome, 0) + 1

    def state(self) -> dict:
        """For the admin reload answer: how many keys, and each key's current usage."""
        now = self.clock()
        out = {}
        for kid, usage in sorted(self.usage.items()):
            usage.expire(now)
            out[kid] = {
                "open_streams": usage.open,
                "requests_last_minute": len(usage.admitted),
                "tokens_last_minute": usage.charged_sum,
            }
        return {"enabled": self.enabled, "keys": len(self.table), "usage": out}

    # --- metrics ----------------------------------------------------------------------------
    def prometheus(self) -> str:
        """Per-key counters in Prometheus text format (label values are key ids from the
        file: bounded by it)."""
        if not self.enabled:
            return ""
        lines = [
            "# HELP sluice_key_requests_total Client requests by API key id and outcome (this edge).",
            "# TYPE sluice_key_requests_total counter",
        ]
        for kid, usage in sorted(self.usage.items()):
            for outcome, n in sorted(usage.outcomes.items()):
                lines.append(f'sluice_key_requests_total{{key_id="{kid}",outcome="{outcome}"}} {n}')
        lines += [
            "# HELP sluice_key_tokens_total Tokens charged to each API key (provider usage, else estimated).",
            "# TYPE sluice_key_tokens_total counter",
        ]
        lines += [
            f'sluice_key_tokens_total{{key_id="{kid}"}} {u.tokens_total}' for kid, u in sorted(self.usage.items())
        ]
        lines += [
            "# HELP sluice_key_open_streams Streams each API key has open on this edge.",
            "# TYPE sluice_key_open_streams gauge",
        ]
        lines += [f'sluice_key_open_streams{{key_id="{kid}"}} {u.open}' for kid, u in sorted(self.usage.items())]
        lines += [
            "# HELP sluice_key_auth_failures_total Requests refused for a missing or unknown API key.",
            "# TYPE sluice_key_auth_failures_total counter",
        ]
        lines += [f'sluice_key_auth_failures_total{{reason="{r}"}} {n}' for r, n in sorted(self.failures.items())]
        return "\n".join(lines) + "\n"
