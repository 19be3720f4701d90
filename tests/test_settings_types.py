"""protocols/settings.py: the typed views of the settings, in step with protocols/config.py."""

from __future__ import annotations

import dataclasses

import pytest

from protocols import config
from protocols.settings import CoalescerFlags, PacerSettings, ProviderConfig, flags_from, settings_from

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
