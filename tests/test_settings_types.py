"""protocols/settings.py: the typed views of the settings, in step with protocols/config.py."""

from __future__ import annotations

import dataclasses

import pytest

from protocols import config
from protocols.settings import (
    CoalescerFlags,
    PacerSettings,
    ProviderConfig,
    flags_from,
    settings_from,
    validate_thresholds,
)

pytestmark = pytest.mark.unit

ENV = {
    "OPENAI_API_KEYS": "k1,k2",
    "OPENAI_BASE_URL": "http://127.0.0.1:1",
    "OPENAI_H2C": "1",
    "OPENAI_KEEPALIVE_S": "3",
}


def test_every_provider_entry_is_a_provider_config():
    providers = config.load(ENV).providers
    assert all(isinstance(entry, ProviderConfig) for entry in providers.values())
    openai = providers["openai"]
    assert openai == ProviderConfig("OPENAI", "openai", "http://127.0.0.1:1", "gpt-4o-mini", ("k1", "k2"), True, 3.0)
    simulated = providers["simulated"]
    assert simulated.api_keys == (None,) and simulated.base_url == "" and simulated.h2c is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        openai.base_url = "http://elsewhere"  # type: ignore[misc]


def test_every_account_entry_is_pacer_settings():
    for values in config.load(ENV).accounts.values():
        assert isinstance(values, PacerSettings) and values.validated() == values


def test_live_changes_make_new_frozen_values_and_name_bad_keys():
    flags = CoalescerFlags()
    changed = flags_from(flags, {"coalesce_enabled": False, "error_ttl_s": 1})
    assert changed == CoalescerFlags(False, True, 1.0) and flags == CoalescerFlags()
    with pytest.raises(dataclasses.FrozenInstanceError):
        flags.coalesce_enabled = False  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown coalescer flag 'nope'"):
        flags_from(flags, {"nope": True})
    assert settings_from(PacerSettings(), {"rps": 5, "rpm": 0}).rps == 5.0
    with pytest.raises(ValueError, match="'burst'"):
        settings_from(PacerSettings(), {"burst": 1.5})


@pytest.mark.parametrize(
    "changes",
    [
        {"burst": 1e30},  # an integral float: int(1e30) passed, and no message could carry the Pacer's state
        {"concurrency": 1e19},
        {"max_queue": 1e19},
        {"rpm": 1e30},
        {"max_wait_s": "inf"},  # float("inf"): the Pacer's timer raised, its state was not JSON
        {"max_wait_s": "nan"},
        {"max_wait_s": 1e15},  # beyond what Thespian's timers (datetime) can wait for
    ],
    ids=str,
)
def test_absurd_pacer_settings_are_refused(changes):
    with pytest.raises(ValueError, match=next(iter(changes))):
        settings_from(PacerSettings(), changes)


@pytest.mark.parametrize("ttl", [float("inf"), float("nan"), 1e308, -1])
def test_absurd_error_ttls_are_refused(ttl):
    with pytest.raises(ValueError, match="error_ttl_s"):
        flags_from(CoalescerFlags(), {"error_ttl_s": ttl})


def test_an_alert_window_no_message_can_carry_is_refused():
    with pytest.raises(ValueError, match="perf_window"):
        validate_thresholds({"perf_window": 1e30})
    assert validate_thresholds({"perf_window": 1e9}) == {"perf_window": 1_000_000_000}


@pytest.mark.parametrize(
    "env, name",
    [
        ({"PACER_MAX_WAIT_MS": "1e18"}, "max_wait_s"),
        ({"SIMULATED_BURST": "2000000000"}, "burst"),
        ({"COALESCE_ERROR_TTL_S": "inf"}, "COALESCE_ERROR_TTL_S"),
        ({"COALESCE_ERROR_TTL_S": "nan"}, "COALESCE_ERROR_TTL_S"),
    ],
)
def test_the_environment_is_held_to_the_same_bounds(env, name):
    with pytest.raises(config.ConfigError, match=name):
        config.load(env)
