"""The gateway's whole configuration as one frozen value, `Settings`, and its wire form.

`protocols/config.py` `load(env)` builds it; every reader reads a typed field
(`settings.actor_port`, `settings.providers["openai"].base_url`) instead of a dict keyed by
environment-variable names. A key is still defined once, in config's `KEYS` table: each
entry has the field `field_name(KEY)` here (its name in lower case, without `SLUICE_`:
SLUICE_ACTOR_PORT -> `actor_port`, COALESCER_SHARDS -> `coalescer_shards`), holding the
parsed value (for SLUICE_MODEL_ALIASES and SLUICE_CORS_ORIGINS: the parsed structure); the
four `DERIVED` fields are built from several variables each. A unit test keeps the fields
and `KEYS` in step (tests/test_gateway_settings.py).

`to_wire()` / `from_wire(dict)` are the one boundary with msgpack and JSON: the Supervisor
sends `to_wire()` in every `Wire` (the message keeps a plain dict field), run.py hands it
to edge workers as JSON, and `from_wire` checks every name and type on the way back in,
raising `SettingsError` (a ValueError) that names the field, so that a bad `Wire` gets an
error reply instead of a crash deep in an actor (actors/host.py). Pure code: no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, replace
from typing import Any, Union

from protocols.settings import PacerSettings, ProviderConfig


class SettingsError(ValueError):
    """A wire form of `Settings` that does not fit: the message names the field."""


@dataclass(frozen=True)
class Failover:
    """One account's failover (config `<PREFIX>_FALLBACK`, `_FALLBACK_QUEUE`)."""

    keys: int = 1  # API keys the account has (one bucket and circuit each, in the Pacer)
    fallbacks: tuple[tuple[str, str], ...] = ()  # (provider, model), tried in order
    fallback_queue: int = 0  # queue length beyond which a fallback is tried (0: never for the queue)


# Fields built from several variables each (config.py `_alert_thresholds`, `_accounts`, ...).
DERIVED = ("alert_thresholds", "accounts", "providers", "failover")


def field_name(key: str) -> str:
    """The `Settings` field of config key `key`: SLUICE_ACTOR_PORT -> "actor_port"."""
    return key.removeprefix("SLUICE_").lower()


@dataclass(frozen=True)
class Settings:
    """Everything protocols/config.py `load` parsed. Frozen: a change is a new value
    (`dataclasses.replace`), e.g. run.py filling in the simulated provider's URL."""

    # --- one field per config KEYS entry, in its order ---------------------------------
    host: str
    actor_host: str
    port: int
    workers: int
    actor_port: int
    join: str | None  # the leader's "host:port" (None: this host leads)
    provider: str
    sim_port: int
    keepalive_s: float
    resume_grace_s: float
    max_body_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections_per_client: int
    db: str
    admin_token: str | None
    cluster_secret: str | None
    secret_file: str | None
    log_level: str
    log_format: str
    access_log: bool
    log_prompts: bool
    drain_s: float
    api_keys_file: str | None
    model_aliases: dict[str, tuple[str, str]]  # alias -> (provider, model)
    cors_origins: tuple[str, ...]
    coalesce_enabled: bool
    stream_fanout_enabled: bool
    coalesce_scope: str  # "key" or "global" (load settles the default)
    coalesce_error_ttl_s: float
    coalescer_shards: int
    pools: int  # load settles the default from the cores
    lease_slice: int  # grants a shard may hold ahead of demand (0: off)
    pacer_max_queue: int
    pacer_max_wait_ms: float
    upstream_connect_timeout_s: float
    upstream_read_timeout_s: float
    upstream_max_duration_s: float
    upstream_max_attempts: int
    upstream_retry_deadline_s: float
    upstream_retry_budget: float
    upstream_retry_min: int
    upstream_retry_backoff_s: float
    circuit_failures: int
    circuit_failure_rate: float
    circuit_window_s: float
    circuit_open_s: float
    circuit_max_open_s: float
    # --- DERIVED ---------------------------------------------------------------------------
    alert_thresholds: dict[str, float]  # SLUICE_ALERT_<NAME> -> name: value
    accounts: dict[str, PacerSettings]  # account (env prefix) -> its Pacer's settings
    providers: dict[str, ProviderConfig]  # the providers served, by name
    failover: dict[str, Failover]  # account -> its keys and fallbacks

    @property
    def cluster_host(self) -> str:
        """This host's name in a cluster: SLUICE_ACTOR_HOST:SLUICE_ACTOR_PORT, unique in it
        (actors/placement.py HOST; Submit.host, Wire.hosts)."""
        return f"{self.actor_host}:{self.actor_port}"

    def redacted(self, api_keys: bool = False) -> Settings:
        """Without the admin token and the cluster secret, and without provider API keys
        unless `api_keys` (the Pool's: it puts them in the upstream auth header). Only the
        Supervisor, which checks the admin CLI's token, is sent the settings whole."""
        providers = self.providers if api_keys else {n: replace(p, api_keys=(None,)) for n, p in self.providers.items()}
        return replace(self, providers=providers, admin_token=None, cluster_secret=None)

    def to_wire(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars (msgpack and JSON carry them as they are)."""
        plain: dict[str, Any] = _plain(self)
        return plain

    @classmethod
    def from_wire(cls, raw: Any) -> Settings:
        """The inverse of `to_wire`; SettingsError names an unknown, missing or mistyped field."""
        settings: Settings = _build(raw, cls, "settings")
        return settings


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(value: Any, hint: Any, where: str) -> Any:
    """`value` (plain) as `hint` says, or SettingsError naming `where`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]  # only `X | None` is used
        if inner in (str, int, float, bool) and not _is_scalar(value, inner):
            raise SettingsError(f"{where}: expected {_type_name(hint)}, got {type(value).__name__}")
        return _build(value, inner, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build_dataclass(value, hint, where)
    if hint in (str, int, float, bool) and _is_scalar(value, hint):
        return float(value) if hint is float else value
    if origin is dict and isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise SettingsError(f"{where}: expected text keys, got {key!r}")
        return {k: _build(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise SettingsError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_build(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    raise SettingsError(
        f"{where}: expected {_type_name(hint)}, got {type(value).__name__}"
    )  # never the value: it may be a key


def _is_scalar(value: Any, hint: type) -> bool:
    if isinstance(value, bool):
        return hint is bool  # a bool is an int to Python, never to a setting
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _build_dataclass(value: Any, cls: type, where: str) -> Any:
    if not isinstance(value, dict):
        raise SettingsError(f"{where}: expected a map of {cls.__name__}'s fields, got {type(value).__name__}")
    hints = _hints(cls)
    fields = dataclasses.fields(cls)
    unknown = sorted(set(value) - {f.name for f in fields}, key=str)
    if unknown:
        raise SettingsError(f"{where}: unknown field(s) {unknown}")
    missing = [f.name for f in fields if f.name not in value]  # to_wire writes every field, defaults too
    if missing:
        raise SettingsError(f"{where}: missing field(s) {missing}")
    return cls(**{name: _build(v, hints[name], f"{where}.{name}") for name, v in value.items()})


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
