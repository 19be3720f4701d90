"""protocols/gateway_settings.py: one typed field per configuration key, and the wire form
(`to_wire` / `from_wire`) that Wire messages and edge workers carry."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.host import HostActor
from protocols import config
from protocols import messages as m
from protocols.gateway_settings import DERIVED, Failover, Settings, SettingsError, field_name
from protocols.settings import PacerSettings

pytestmark = pytest.mark.unit

SECRET = "s" * 40


def test_every_key_has_its_field_and_every_field_a_key():
    names = [field_name(key) for key in config.KEYS]
    assert len(set(names)) == len(names)  # no two keys share a field
    assert [f.name for f in dataclasses.fields(Settings)] == names + list(DERIVED)
    assert field_name("SLUICE_ACTOR_PORT") == "actor_port" and field_name("COALESCER_SHARDS") == "coalescer_shards"


def test_load_fills_every_field_with_its_type():
    s = config.load(
        {
            "SLUICE_PORT": "8080",
            "SLUICE_ADMIN_TOKEN": "t0ken",
            "SLUICE_CLUSTER_SECRET": SECRET,
            "SLUICE_API_KEYS_FILE": "keys.json",
            "SLUICE_MODEL_ALIASES": "fast=openai",
            "SLUICE_CORS_ORIGINS": "https://a.example",
            "OPENAI_API_KEYS": "k1,k2",
            "OPENAI_BASE_URL": "http://127.0.0.1:1",
            "SIMULATED_FALLBACK": "openai/gpt-x",
            "SLUICE_ALERT_TTFT_P95_MS": "2000",
        }
    )
    assert (s.port, s.admin_token, s.cluster_secret, s.coalesce_scope) == (8080, "t0ken", SECRET, "key")
    assert s.model_aliases == {"fast": ("openai", "gpt-4o-mini")} and s.cors_origins == ("https://a.example",)
    assert s.accounts["PERPLEXITY"] == PacerSettings(1.0, 2, 3, 50, 1000, 30.0)
    assert s.providers["openai"].api_keys == ("k1", "k2") and s.providers["openai_responses"].account == "OPENAI"
    assert s.failover["SIMULATED"] == Failover(1, (("openai", "gpt-x"),), 0) and s.failover["OPENAI"].keys == 2
    assert s.alert_thresholds == {"ttft_p95_ms": 2000.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]


# Environments the property draws from: every kind of field gets a non-default value.
CHOICES = {
    "SLUICE_PORT": st.integers(0, 65535).map(str),
    "SLUICE_KEEPALIVE_S": st.floats(0.001, 1e6).map(repr),
    "SLUICE_ADMIN_TOKEN": st.text(min_size=1).filter(lambda t: "\x00" not in t),
    "SLUICE_CLUSTER_SECRET": st.just(SECRET),
    "SLUICE_LOG_PROMPTS": st.sampled_from(["0", "1"]),
    "SLUICE_MODEL_ALIASES": st.just("fast=simulated,big=simulated/sim-9"),
    "SLUICE_CORS_ORIGINS": st.just("*"),
    "SLUICE_POOLS": st.integers(1, 64).map(str),
    "OPENAI_API_KEYS": st.just("k1,k2,k3"),
    "ANTHROPIC_BASE_URL": st.just("http://127.0.0.1:9"),
    "PERPLEXITY_RPM": st.integers(0, 100).map(str),
    "SLUICE_ALERT_ERROR_RATE": st.floats(0, 0.99).map(repr),
}


@settings(max_examples=60, deadline=None)
@given(st.fixed_dictionaries({}, optional=CHOICES))
def test_the_wire_form_round_trips_through_msgpack_and_json(env):
    s = config.load(env)
    assert Settings.from_wire(s.to_wire()) == s
    assert Settings.from_wire(json.loads(json.dumps(s.to_wire()))) == s  # edge workers' stdin
    wire = m.decode(m.encode(m.Wire("pool", {}, s.to_wire())))
    assert isinstance(wire, m.Wire) and Settings.from_wire(wire.settings) == s
    public = s.redacted()
    assert Settings.from_wire(public.to_wire()) == public


def test_redacted_has_no_secret_and_nothing_else_changed():
    s = config.load({"OPENAI_API_KEYS": "sk-1,sk-2", "SLUICE_ADMIN_TOKEN": "t", "SLUICE_CLUSTER_SECRET": SECRET})
    public = s.redacted()
    text = json.dumps(public.to_wire())
    assert "sk-1" not in text and SECRET not in text and public.admin_token is None
    assert all(p.api_keys == (None,) for p in public.providers.values())
    assert dataclasses.replace(public, providers=s.providers, admin_token="t", cluster_secret=SECRET) == s
    pools = s.redacted(api_keys=True)  # the Pool's: the keys, never the admin token
    assert pools.providers == s.providers and pools.admin_token is None and pools.cluster_secret is None


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda w: w.update(colour="blue"), r"settings: unknown field\(s\) \['colour'\]"),
        (lambda w: w.pop("actor_port"), r"settings: missing field\(s\) \['actor_port'\]"),
        (lambda w: w.update(actor_port="19500"), r"settings\.actor_port: expected int, got str"),
        (lambda w: w.update(access_log=1), r"settings\.access_log: expected bool, got int"),
        (lambda w: w.update(workers=True), r"settings\.workers: expected int, got bool"),
        (lambda w: w.update(providers=[]), r"settings\.providers: expected dict"),
        (
            lambda w: w["providers"]["simulated"].update(api_keys=["sk-secret", 7]),
            r"settings\.providers\['simulated'\]\.api_keys\[1\]: expected str \| None, got int",
        ),
        (
            lambda w: w["accounts"]["OPENAI"].pop("rps"),
            r"settings\.accounts\['OPENAI'\]: missing field\(s\) \['rps'\]",
        ),
        (lambda w: w["failover"]["OPENAI"].update(fallbacks=[["a"]]), r"fallbacks\[0\]: expected 2 items, got 1"),
        (lambda w: w["model_aliases"].update({1: ["a", "b"]}), r"settings\.model_aliases: expected text keys"),
    ],
)
def test_from_wire_names_what_does_not_fit(change, says):
    wire = config.load({}).to_wire()
    change(wire)
    with pytest.raises(SettingsError, match=says) as info:
        Settings.from_wire(wire)
    assert "sk-secret" not in str(info.value)  # a value is never echoed: it may be a key
    with pytest.raises(SettingsError, match="expected a map"):
        Settings.from_wire(["not", "a", "map"])


class Host(HostActor):
    """A HostActor outside Thespian: what it sends is kept."""

    def __init__(self):
        super().__init__()
        self.sent: list = []

    def send(self, to, msg):
        self.sent.append((to, m.decode(msg)))


def test_a_bad_wire_gets_an_error_reply_and_changes_nothing():
    good = config.load({}).to_wire()
    host = Host()
    # (the Supervisor's role: a child would answer Ready with its Thespian address)
    host.receiveMessage(m.encode(m.Wire("supervisor", {"metrics": "127.0.0.1:1"}, good)), "run.py")
    assert host.settings == Settings.from_wire(good) and host.directory == {"metrics": "127.0.0.1:1"}
    assert host.sent == []
    before = (host.settings, dict(host.directory))
    host.receiveMessage(m.encode(m.Wire("supervisor", {"pool": "127.0.0.1:2"}, {**good, "workers": "2"})), "run.py")
    to, reply = host.sent[-1]
    assert to == "run.py" and isinstance(reply, m.ErrorReply) and reply.code == "bad_message"
    assert "settings.workers: expected int" in reply.message
    assert (host.settings, host.directory) == before


def test_the_upstream_max_duration_defaults_to_600_s_and_refuses_what_is_no_duration():
    assert config.load({}).upstream_max_duration_s == 600.0
    assert config.load({"UPSTREAM_MAX_DURATION_S": "1.5"}).upstream_max_duration_s == 1.5
    assert config.load({"UPSTREAM_MAX_DURATION_S": "0"}).upstream_max_duration_s == 0.0  # no bound
    for bad in ("-3", "nan", "inf", "ten", ""):
        with pytest.raises(config.ConfigError, match="UPSTREAM_MAX_DURATION_S"):
            config.load({"UPSTREAM_MAX_DURATION_S": bad})
