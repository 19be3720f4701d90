"""Every configuration key, its default, and how it is parsed: defined once, here.

`load(env)` takes a mapping (normally `os.environ`) and returns the frozen `Settings`
(protocols/gateway_settings.py: one typed field per key), or raises `ConfigError` naming
the variable that is wrong. Pure code: no I/O.
The README's configuration table is this module, in prose.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from protocols.gateway_settings import Settings, field_name
from protocols.settings import MAX_SECONDS, PacerSettings


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the variable."""


# provider name (also its adapter's name in protocols/providers) -> environment prefix,
# which names the account whose rate limit one Pacer guards.
PROVIDERS: dict[str, str] = {
    "simulated": "SIMULATED",
    "openai": "OPENAI",
    "openai_responses": "OPENAI",
    "anthropic": "ANTHROPIC",
    "perplexity": "PERPLEXITY",
    "perplexity_sonar": "PERPLEXITY",
    "ollama": "OLLAMA",
}

# Pacer defaults per account: (rps, burst, concurrency, rpm). Perplexity's are the
# production settings of the sign-off sheet (tier 0 allows 50 requests a minute).
PACER_DEFAULTS: dict[str, tuple[float, int, int, int | None]] = {
    "SIMULATED": (200.0, 200, 500, None),
    "OPENAI": (10.0, 20, 50, None),
    "ANTHROPIC": (5.0, 10, 20, None),
    "PERPLEXITY": (1.0, 2, 3, 50),
    "OLLAMA": (100.0, 100, 4, None),
}

DEFAULT_MODELS = {
    "simulated": "sim-1",
    "openai": "gpt-4o-mini",
    "openai_responses": "gpt-4o-mini",
    "anthropic": "claude-sonnet-4-5",
    "perplexity": "sonar",
    "perplexity_sonar": "sonar",
    "ollama": "llama3.2",
}


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError("must be > 0")
        return value

    return parse


def _error_ttl(text: str) -> float:
    """COALESCE_ERROR_TTL_S: as the admin's set-flags takes it (inf made the Coalescer's
    timer raise, and its state unreadable as JSON)."""
    value = float(text)
    if not 0 <= value <= MAX_SECONDS:
        raise ValueError(f"must be >= 0 and <= {MAX_SECONDS:.0f} (a year)")
    return value


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError("must be >= 0")
        return value

    return parse


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError("expected text or json")
    return text


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number 0..65535")
    return value


def _join_address(text: str) -> str | None:
    """SLUICE_JOIN: "host:port" of the leader's actor system, or the leader candidates
    "host:port,host:port,..." in order ("" = this host leads alone): normalized, comma-joined."""
    if not text.strip():
        return None
    addresses = []
    for part in text.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(
                "must be host:port (the leader's SLUICE_ACTOR_HOST and SLUICE_ACTOR_PORT), "
                "or a comma-separated list of them (the leader candidates, in order)"
            )
        if host.strip() in ("0.0.0.0", "::", "[::]"):
            raise ValueError("must name the leader's address, not a wildcard")
        address = f"{host.strip()}:{int(port)}"
        if address in addresses:
            raise ValueError(f"names {address} twice")
        addresses.append(address)
    return ",".join(addresses)


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError("must be a share > 0 and <= 1")
    return value


def _scope(text: str) -> str:
    if text not in ("key", "global"):
        raise ValueError("expected key or global")
    return text


def _provider(text: str) -> str:
    if text not in PROVIDERS:
        raise ValueError(f"unknown provider (known: {', '.join(PROVIDERS)})")
    return text


CLUSTER_SECRET_MIN_CHARS = 32


def _cluster_secret(text: str) -> str:
    # The key is the UTF-8 bytes of the value as given (a hex string is not decoded): one
    # rule for the variable and the secret file. 32 characters of hex are 128 bits.
    value = text.strip()
    if len(value) < CLUSTER_SECRET_MIN_CHARS:
        raise ValueError(
            f"must be at least {CLUSTER_SECRET_MIN_CHARS} characters (e.g. the output of "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )
    return value


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or "localhost"; "0.0.0.0", "" and every other name are not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def reachable_host(host: str) -> str:
    """The address to connect to a socket bound to `host` from this machine (a wildcard
    bind is reached on loopback)."""
    if host.strip() in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host.strip().strip("[]") == "::":
        return "::1"
    return host


# Values never echoed in an error message.
SECRET_KEYS = ("SLUICE_CLUSTER_SECRET", "SLUICE_ADMIN_TOKEN")

# name -> (default, parser, meaning). The default is a string, parsed like the env value.
KEYS: dict[str, tuple[str | None, Callable[[str], Any], str]] = {
    "SLUICE_HOST": ("127.0.0.1", str, "interface the HTTP edge binds (only the edge: see SLUICE_ACTOR_HOST)"),
    "SLUICE_ACTOR_HOST": (
        "127.0.0.1",
        str,
        "interface the actor system, the stream hub and the built-in simulated "
        "provider bind; off loopback only with SLUICE_CLUSTER_SECRET set",
    ),
    "SLUICE_PORT": ("8000", _port, "HTTP port of the edge"),
    "SLUICE_WORKERS": (
        "1",
        _positive(int),
        "edge worker processes serving SLUICE_PORT (1: the edge runs in run.py's "
        "own process; a 16-core server: about 4-8, see docs/operations.md)",
    ),
    "SLUICE_ACTOR_PORT": ("19500", _port, "Thespian admin port of the actor system"),
    "SLUICE_JOIN": (
        "",
        _join_address,
        "host:port of the leader's actor system: this host joins its Thespian Convention "
        "(the leader's Pacers, Coalescer shards and Metrics; its own edges and Pools; "
        "needs SLUICE_CLUSTER_SECRET). A comma-separated list: the leader candidates in order, "
        "the same on every host (a standby leader takes over when the leader is lost). "
        "Empty: this host leads (docs/scale-out.md)",
    ),
    "SLUICE_PROVIDER": ("simulated", _provider, "default provider for requests that name none"),
    "SLUICE_SIM_PORT": ("0", _port, "port of the built-in simulated provider (0 = any free port)"),
    "SLUICE_KEEPALIVE_S": ("15", _positive(float), "seconds between keepalive pings on a waiting SSE stream"),
    "SLUICE_RESUME_GRACE_S": (
        "30",
        _positive(float),
        "seconds a resumable stream's upstream call goes on after its "
        "client disconnected, waiting for GET /api/chat/{request_id}/events",
    ),
    "SLUICE_MAX_BODY_BYTES": ("1048576", _positive(int), "largest accepted request body (413 beyond)"),
    "SLUICE_HEADER_TIMEOUT_S": (
        "10",
        _positive(float),
        "seconds a connection may take to send complete request headers (closed beyond)",
    ),
    "SLUICE_BODY_TIMEOUT_S": (
        "30",
        _positive(float),
        "seconds a request may take to send its whole body once its headers are in (408 beyond)",
    ),
    "SLUICE_MAX_CONNECTIONS_PER_CLIENT": (
        "256",
        _non_negative(int),
        "open connections one client address may hold; more get a 503 (0 = no cap)",
    ),
    "SLUICE_DB": ("data/sluice.sqlite3", str, "SQLite file holding chat threads"),
    "SLUICE_ADMIN_TOKEN": (None, str, "bearer token for /api/admin and `run.py admin` (admin is off when unset)"),
    "SLUICE_CLUSTER_SECRET": (
        None,
        _cluster_secret,
        "authenticates every frame between sluice's processes "
        f"(>= {CLUSTER_SECRET_MIN_CHARS} characters); unset: a random one per start, in "
        "SLUICE_SECRET_FILE",
    ),
    "SLUICE_SECRET_FILE": (
        None,
        str,
        "where run.py keeps its random cluster secret (mode 0600) for the admin CLI; "
        "default: cluster-<SLUICE_ACTOR_PORT>.secret next to SLUICE_DB",
    ),
    "SLUICE_LOG_LEVEL": ("INFO", _log_level, "log level"),
    "SLUICE_LOG_FORMAT": ("text", _log_format, "log lines as text, or json: one JSON object per line"),
    "SLUICE_ACCESS_LOG": ("1", _bool, "one access line per request (INFO, logger sluice.access)"),
    "SLUICE_LOG_PROMPTS": ("0", _bool, "access lines include the request's messages (off: never a prompt in the log)"),
    "SLUICE_DRAIN_S": (
        "30",
        _non_negative(float),
        "on SIGTERM, seconds open streams may take to finish before they are ended",
    ),
    "SLUICE_API_KEYS_FILE": (
        None,
        str,
        "JSON file of hashed client API keys and their limits (unset: every client is allowed)",
    ),
    "SLUICE_MODEL_ALIASES": (
        None,
        str,
        "model names clients may use, each resolved to a provider and model: "
        "alias=provider[/model],... (e.g. gpt-4o=openai/gpt-4o,fast=simulated/sim-1)",
    ),
    "SLUICE_CORS_ORIGINS": (
        None,
        str,
        "browser origins allowed to call the API from other pages: origin,... or * (unset: none)",
    ),
    "COALESCE_ENABLED": ("1", _bool, "share one upstream call among identical in-flight requests"),
    "STREAM_FANOUT_ENABLED": ("1", _bool, "followers get the shared stream live (else whole at the end)"),
    "COALESCE_SCOPE": (
        None,
        _scope,
        "key: only requests of the same API key share a call; global: any "
        "(default key with SLUICE_API_KEYS_FILE, else global)",
    ),
    "COALESCE_ERROR_TTL_S": ("2", _error_ttl, "seconds a failure is replayed to identical requests"),
    "COALESCER_SHARDS": (
        None,
        _positive(int),
        "number of key-sharded Coalescer actors; default: 1 with one edge worker and no "
        "SLUICE_JOIN or SLUICE_CLUSTER_SECRET, else 2 (a member host where it is unset takes the leader's)",
    ),
    "SLUICE_POOLS": (
        None,
        _positive(int),
        "Pool processes (each with its own stream hub) the upstream calls spread over; "
        "default: 1 on up to 4 cores, else cores // 4 (4 on 16 cores)",
    ),
    "SLUICE_LEASE_SLICE": (
        "8",
        _non_negative(int),
        "lease grants a Coalescer shard may hold ahead of demand, from the Pacer's surplus "
        '(0: off, every call asks the Pacer); see docs/architecture.md, "Lease slices"',
    ),
    "PACER_MAX_QUEUE": ("1000", int, "requests that may wait for an upstream slot (429 beyond)"),
    "PACER_MAX_WAIT_MS": ("30000", _positive(float), "longest wait for an upstream slot (429 beyond)"),
    "UPSTREAM_CONNECT_TIMEOUT_S": ("10", _positive(float), "upstream connect timeout"),
    "UPSTREAM_READ_TIMEOUT_S": ("60", _positive(float), "upstream read timeout (longest silence mid-stream)"),
    "UPSTREAM_MAX_DURATION_S": (
        "600",
        _non_negative(float),
        "longest an upstream call (each attempt) may take, from asking for a connection to its last byte (0: no bound)",
    ),
    "UPSTREAM_MAX_ATTEMPTS": (
        "3",
        _positive(int),
        "upstream calls per request at most, the first included (1 = never retry)",
    ),
    "UPSTREAM_RETRY_DEADLINE_S": (
        "15",
        _positive(float),
        "a retry must start within this many seconds of the first attempt",
    ),
    "UPSTREAM_RETRY_BUDGET": (
        "0.2",
        _non_negative(float),
        "retries per account at most this share of its calls over 10 s (or UPSTREAM_RETRY_MIN)",
    ),
    "UPSTREAM_RETRY_MIN": ("5", _non_negative(int), "retries per account always allowed in 10 s, whatever the share"),
    "UPSTREAM_RETRY_BACKOFF_S": (
        "0.1",
        _non_negative(float),
        "first wait before retrying a connect error or a 5xx without Retry-After (doubles per attempt, x 0.5-1 jitter)",
    ),
    "CIRCUIT_FAILURES": (
        "5",
        _non_negative(int),
        "failed calls in a row that open an API key's circuit (0: no circuit breaker)",
    ),
    "CIRCUIT_FAILURE_RATE": (
        "0.5",
        _share,
        "... or this share of a key's calls failed over CIRCUIT_WINDOW_S (10 calls at least)",
    ),
    "CIRCUIT_WINDOW_S": ("30", _positive(float), "seconds over which a key's failure share is counted"),
    "CIRCUIT_OPEN_S": ("10", _positive(float), "seconds an open circuit waits before one probe call (half-open)"),
    "CIRCUIT_MAX_OPEN_S": ("120", _positive(float), "the wait doubles after each failed probe, up to this"),
}

# Seconds an idle pooled upstream connection is kept (<ACCOUNT>_KEEPALIVE_S): below the
# 5 s idle timeout of hypercorn, uvicorn and Node, so our side lets go first.
DEFAULT_KEEPALIVE_S = "4"


def account(provider: str) -> str:
    return PROVIDERS[provider]


def default_pools(cores: int | None) -> int:
    """SLUICE_POOLS when unset: one Pool per 4 cores, one on a laptop. A Pool is one
    process whose loop carries every token of its streams; the edges, the actors and the
    provider's TLS need the other cores (docs/architecture.md, "Several Pools")."""
    cores = cores or 1
    return 1 if cores <= 4 else cores // 4


def default_shards(workers: int, clustered: bool) -> int:
    """COALESCER_SHARDS when unset. One edge worker sends a shard a third of the CPU it
    spends itself (~1.8 vs ~6 ms a stream), so one shard keeps up with it, and a second
    would idle as a process of ~6 MiB (docs/benchmarks.md, "Idle memory"). More workers
    get two, so that one busy or lost shard is not every key's; so does a host of a cluster
    (it joins one, or has a cluster secret of its own for members to join with), so that a
    member holds a shard and the count does not change with the leader's workers."""
    return 1 if workers <= 1 and not clustered else 2


def load(env: Mapping[str, str]) -> Settings:
    """Parse the whole configuration; ConfigError names the first bad variable."""
    settings: dict[str, Any] = {}
    for name, (default, parse, _meaning) in KEYS.items():
        raw = env.get(name, default)
        if raw is None:
            settings[name] = None
            continue
        try:
            settings[name] = parse(raw)
        except ValueError as exc:
            shown = "<hidden>" if name in SECRET_KEYS else repr(raw)
            raise ConfigError(f"{name}={shown}: {exc}") from None
    if settings["PACER_MAX_QUEUE"] < 0:
        raise ConfigError(f"PACER_MAX_QUEUE={settings['PACER_MAX_QUEUE']!r}: must be >= 0")
    settings["SLUICE_API_KEYS_FILE"] = settings["SLUICE_API_KEYS_FILE"] or None  # empty = unset
    if settings["SLUICE_POOLS"] is None:
        settings["SLUICE_POOLS"] = default_pools(os.cpu_count())
    if settings["COALESCER_SHARDS"] is None:
        clustered = settings["SLUICE_JOIN"] is not None or settings["SLUICE_CLUSTER_SECRET"] is not None
        settings["COALESCER_SHARDS"] = default_shards(settings["SLUICE_WORKERS"], clustered)
    settings["COALESCE_SCOPE"] = _coalesce_scope(settings)
    if not is_loopback(settings["SLUICE_ACTOR_HOST"]) and settings["SLUICE_CLUSTER_SECRET"] is None:
        raise ConfigError(
            f"SLUICE_ACTOR_HOST={settings['SLUICE_ACTOR_HOST']!r} is off loopback: set SLUICE_CLUSTER_SECRET "
            f"(>= {CLUSTER_SECRET_MIN_CHARS} characters, the same on every process of the cluster) so that "
            "only sluice's own processes can talk to the actors, or bind them to 127.0.0.1"
        )
    if settings["SLUICE_JOIN"] is not None and settings["SLUICE_CLUSTER_SECRET"] is None:
        raise ConfigError(
            "SLUICE_JOIN needs SLUICE_CLUSTER_SECRET: the leader's own secret (a random one could never match it)"
        )
    settings["alert_thresholds"] = _alert_thresholds(env)
    settings["accounts"] = _accounts(env, settings)
    settings["providers"] = _providers(env, settings)
    settings["failover"] = _failover(env, settings)
    settings["model_aliases"] = _model_aliases(settings)
    settings["cors_origins"] = _cors_origins(settings["SLUICE_CORS_ORIGINS"])
    return _typed(settings)


def _typed(settings: dict) -> Settings:
    """The parsed values (keyed by variable name) as `Settings` (one field per key)."""
    plain = {field_name(name): settings[name] for name in KEYS}
    plain["model_aliases"], plain["cors_origins"] = settings["model_aliases"], settings["cors_origins"]
    for name in ("alert_thresholds", "accounts", "providers", "failover"):
        plain[name] = settings[name]
    return Settings.from_wire(plain)


def _model_aliases(settings: dict) -> dict[str, list[str]]:
    """SLUICE_MODEL_ALIASES=alias=provider[/model],...: {alias: [provider, model]}. A target
    names a configured provider (its configured model without /model); an alias is one
    model name, never "provider/..." of a sluice provider (that form already routes)."""
    raw = settings["SLUICE_MODEL_ALIASES"] or ""
    providers = settings["providers"]
    out: dict[str, list[str]] = {}
    for item in [i.strip() for i in raw.split(",") if i.strip()]:
        alias, sep, target = (part.strip() for part in item.partition("="))
        name, _, model = target.partition("/")
        where = f"SLUICE_MODEL_ALIASES={raw!r}: {item!r}"
        if not sep or not alias or not name:
            raise ConfigError(f"{where}: expected alias=provider[/model]")
        if alias.partition("/")[0] in PROVIDERS:
            raise ConfigError(f"{where}: an alias may not start with a provider name (provider/model routes already)")
        if alias in out:
            raise ConfigError(f"{where}: {alias!r} is defined twice")
        if name not in providers:
            raise ConfigError(f"{where}: {name!r} is not a configured provider (configured: {', '.join(providers)})")
        out[alias] = [name, model.strip() or providers[name]["model"]]
    return out


def _cors_origins(raw: str | None) -> list[str]:
    """SLUICE_CORS_ORIGINS=origin,... (scheme://host[:port]) or *: none when unset."""
    origins = [o.strip().rstrip("/") for o in (raw or "").split(",") if o.strip()]
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(f"SLUICE_CORS_ORIGINS={raw!r}: {origin!r} is not an origin (scheme://host[:port]) or *")
    return origins


def _coalesce_scope(settings: dict) -> str:
    """Per key by default when there are keys: a follower learns from its role and its
    TTFT that another client asked the same question, a side channel between tenants."""
    scope, keys = settings["COALESCE_SCOPE"], settings["SLUICE_API_KEYS_FILE"]
    if scope is None:
        return "key" if keys else "global"
    if scope == "key" and not keys:
        raise ConfigError("COALESCE_SCOPE=key: needs SLUICE_API_KEYS_FILE (without keys every client is anonymous)")
    return str(scope)


ALERT_PREFIX = "SLUICE_ALERT_"


def _alert_thresholds(env: Mapping[str, str]) -> dict:
    """SLUICE_ALERT_<THRESHOLD>=<number>, e.g. SLUICE_ALERT_TTFT_P95_MS=2000; the names
    and bounds are the alert rules' (protocols/settings.py), checked by run.py at start."""
    out = {}
    for name, raw in env.items():
        if name.startswith(ALERT_PREFIX):
            try:
                out[name[len(ALERT_PREFIX) :].lower()] = float(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r}: expected a number") from None
    return out


def _accounts(env: Mapping[str, str], settings: dict) -> dict:
    """Pacer settings per account: <PREFIX>_RPS, _BURST, _CONCURRENCY, _RPM."""
    accounts = {}
    for prefix, (rps, burst, concurrency, rpm) in PACER_DEFAULTS.items():
        values: dict[str, Any] = {}
        for suffix, default, parse in (
            ("RPS", rps, _positive(float)),
            ("BURST", burst, _positive(int)),
            ("CONCURRENCY", concurrency, _positive(int)),
            ("RPM", rpm, int),
        ):
            name = f"{prefix}_{suffix}"
            raw = env.get(name)
            if raw is None or raw == "":
                values[suffix.lower()] = default
                continue
            try:
                values[suffix.lower()] = parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{name}={raw!r}: {exc}") from None
        if values["rpm"] is not None and values["rpm"] <= 0:
            values["rpm"] = None  # 0 switches the per-minute cap off
        values["max_queue"] = settings["PACER_MAX_QUEUE"]
        values["max_wait_s"] = settings["PACER_MAX_WAIT_MS"] / 1000.0
        try:  # the bounds the admin's set-pacer is held to, so the Pacer starts with what it accepts
            PacerSettings(**values).validated()
        except ValueError as exc:
            raise ConfigError(
                f"{prefix}_RPS/_BURST/_CONCURRENCY/_RPM, PACER_MAX_QUEUE, PACER_MAX_WAIT_MS: {exc}"
            ) from None
        accounts[prefix] = values
    return accounts


def _providers(env: Mapping[str, str], settings: dict) -> dict:
    """The providers this gateway serves: the default one plus every one with a key or a
    base URL set. Keys are kept here and only ever put in the upstream auth header."""
    out: dict[str, dict[str, Any]] = {}
    for name, prefix in PROVIDERS.items():
        keys: list[str | None] = [*_api_keys(env, prefix)]
        key = keys[0] if keys else None
        base_url = env.get(f"{prefix}_BASE_URL") or None
        if name != settings["SLUICE_PROVIDER"] and key is None and base_url is None:
            continue
        if name == "simulated" and base_url is None:
            base_url = ""  # filled in by run.py once the simulated provider listens
        if base_url and not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{prefix}_BASE_URL={base_url!r}: must start with http:// or https://")
        h2c_raw = env.get(f"{prefix}_H2C", "1" if name == "simulated" else "0")
        try:
            h2c = _bool(h2c_raw)
        except ValueError as exc:
            raise ConfigError(f"{prefix}_H2C={h2c_raw!r}: {exc}") from None
        keepalive_raw = env.get(f"{prefix}_KEEPALIVE_S") or DEFAULT_KEEPALIVE_S
        try:
            keepalive = _positive(float)(keepalive_raw)
        except ValueError as exc:
            raise ConfigError(f"{prefix}_KEEPALIVE_S={keepalive_raw!r}: {exc}") from None
        out[name] = {  # the fields of protocols/settings.py ProviderConfig
            "account": prefix,
            "keepalive_s": keepalive,  # idle pooled connections are closed after this
            "h2c": h2c,  # speak HTTP/2 with prior knowledge to an http:// base URL
            "adapter": name,
            "api_keys": keys or [None],  # every key of the account; "#1" is keys[0]; [None]: none
            "base_url": base_url or "",  # "": unset (the simulated one: run.py fills it in)
            "model": env.get(f"{prefix}_MODEL") or DEFAULT_MODELS[name],
        }
    return out


def _api_keys(env: Mapping[str, str], prefix: str) -> list[str]:
    """<PREFIX>_API_KEYS=k1,k2,... (several keys, load-balanced, each with its own pacer
    budget and circuit) or <PREFIX>_API_KEY=k (one). Never echoed in an error."""
    one, several = env.get(f"{prefix}_API_KEY") or None, env.get(f"{prefix}_API_KEYS") or None
    if one and several:
        raise ConfigError(
            f"{prefix}_API_KEY and {prefix}_API_KEYS are both set: set one (several keys go in {prefix}_API_KEYS)"
        )
    if several is None:
        return [one] if one else []
    keys = [k.strip() for k in several.split(",")]
    if any(not k for k in keys):
        raise ConfigError(f"{prefix}_API_KEYS: an empty key in the list (keys are separated by commas)")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{prefix}_API_KEYS: a key is listed twice")
    return keys


def _failover(env: Mapping[str, str], settings: dict) -> dict:
    """Per account: how many API keys it has, its fallbacks (<PREFIX>_FALLBACK=provider[/model],...,
    tried in order when every key's circuit is open, or the queue is past <PREFIX>_FALLBACK_QUEUE
    (0: never for the queue). A fallback names a configured provider of another account;
    without /model it uses that provider's configured model."""
    out = {}
    providers = settings["providers"]
    for prefix in PACER_DEFAULTS:
        served = [p for p in providers.values() if p["account"] == prefix]
        keys = max([len(p["api_keys"]) for p in served] + [1])
        fallbacks = []
        raw = env.get(f"{prefix}_FALLBACK") or ""
        for item in [i.strip() for i in raw.split(",") if i.strip()]:
            name, _, model = item.partition("/")
            if name not in providers:
                raise ConfigError(
                    f"{prefix}_FALLBACK={raw!r}: {name!r} is not a configured provider "
                    f"(configured: {', '.join(providers)}; set its key or base URL)"
                )
            if providers[name]["account"] == prefix:
                raise ConfigError(
                    f"{prefix}_FALLBACK={raw!r}: {name!r} bills to the same account; "
                    f"several keys of one account go in {prefix}_API_KEYS"
                )
            fallbacks.append([name, model.strip() or providers[name]["model"]])
        queue_raw = env.get(f"{prefix}_FALLBACK_QUEUE") or "0"
        try:
            queue = _non_negative(int)(queue_raw)
        except ValueError as exc:
            raise ConfigError(f"{prefix}_FALLBACK_QUEUE={queue_raw!r}: {exc}") from None
        out[prefix] = {"keys": keys, "fallbacks": fallbacks, "fallback_queue": queue}
    return out
