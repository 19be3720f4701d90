"""Client API keys (edge/api_keys.py): the file, authentication, models, limits and
reloads, driven with an injected clock."""

from __future__ import annotations

import json
import os

import pytest

from edge.api_keys import (
    WINDOW_S,
    ApiKeys,
    ClientKey,
    Denial,
    KeysFileError,
    conflicting_credentials,
    hash_key,
    parse_keys,
    presented_key,
    stream_tokens,
)
from protocols import config
from protocols import events as ev
from protocols.keys import coalescing_key

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(key_id: str, secret: str, **limits) -> dict:
    return {"id": key_id, "sha256": hash_key(secret), **limits}


def write(path, *entries) -> str:
    path.write_text(json.dumps({"keys": list(entries)}))
    return str(path)


@pytest.fixture
def clock():
    return Clock()


def keys_with(tmp_path, clock, *entries) -> ApiKeys:
    return ApiKeys(write(tmp_path / "keys.json", *entries), clock=clock)


# --- the file --------------------------------------------------------------------------------


def test_a_good_file_is_a_table_by_digest_with_defaults():
    table = parse_keys(json.dumps({"keys": [entry("a", "sk-a", rpm=5), {"id": "b", "sha256": "AB" * 32}]}))
    assert table[hash_key("sk-a")] == ClientKey("a", rpm=5)
    assert table["ab" * 32] == ClientKey("b")  # hex is case-insensitive; limits optional; models "*"


@pytest.mark.parametrize(
    "doc, needle",
    [
        ("not json", "not JSON"),
        ("[]", '{"keys": [...]}'),
        ({"keys": ["x"]}, "keys[0]: must be an object"),
        ({"keys": [{"sha256": "ab" * 32}]}, "'id'"),
        ({"keys": [{"id": "a b", "sha256": "ab" * 32}]}, "'id'"),
        ({"keys": [{"id": "a", "sha256": "xyz"}]}, "'sha256' must be the 64 hex digits"),
        ({"keys": [{"id": "a", "sha256": "ab" * 32, "rmp": 5}]}, "unknown field(s) rmp"),
        ({"keys": [{"id": "a", "sha256": "ab" * 32, "rpm": 0}]}, "'rpm' must be a positive integer"),
        ({"keys": [{"id": "a", "sha256": "ab" * 32, "tpm": "10"}]}, "'tpm' must be a positive integer"),
        ({"keys": [{"id": "a", "sha256": "ab" * 32, "concurrency": True}]}, "'concurrency'"),
        # beyond a message's 64 bits: with several workers every request of the key was a 503
        ({"keys": [{"id": "a", "sha256": "ab" * 32, "rpm": 10**20}]}, "'rpm' must be at most"),
        ({"keys": [{"id": "a", "sha256": "ab" * 32, "tpm": 2**64}]}, "'tpm' must be at most"),
        ({"keys": [{"id": "a", "sha256": "ab" * 32, "models": "*"}]}, "'models' must be a list"),
        ({"keys": [{"id": "a", "sha256": "ab" * 32}, {"id": "a", "sha256": "cd" * 32}]}, "duplicate id"),
        ({"keys": [{"id": "a", "sha256": "ab" * 32}, {"id": "b", "sha256": "AB" * 32}]}, "same key hash as 'a'"),
    ],
)
def test_a_bad_file_names_the_problem(doc, needle):
    with pytest.raises(KeysFileError) as info:
        parse_keys(doc if isinstance(doc, str) else json.dumps(doc))
    assert needle in str(info.value)


def test_an_unreadable_file_is_an_error_at_start(tmp_path, clock):
    with pytest.raises(KeysFileError, match="cannot read"):
        ApiKeys(str(tmp_path / "absent.json"), clock=clock)


def test_the_key_arrives_as_bearer_or_x_api_key():
    assert presented_key({"authorization": "Bearer sk-1"}) == "sk-1"
    assert presented_key({"authorization": "bearer  sk-1 "}) == "sk-1"
    assert presented_key({"x-api-key": "sk-2"}) == "sk-2"
    assert presented_key({"authorization": "Basic abc"}) is None
    assert presented_key({"authorization": "Bearer "}) is None
    assert presented_key({}) is None


def test_two_different_keys_in_one_request_are_a_conflict():
    """A proxy in front may check the last of two Authorization headers while sluice reads
    the first: two different values of one credential header are refused, not guessed."""
    from starlette.datastructures import Headers

    def headers(*pairs):
        return Headers(raw=[(k.encode(), v.encode()) for k, v in pairs])

    for name in ("authorization", "x-api-key"):
        value = "Bearer sk-%s" if name == "authorization" else "sk-%s"
        problem = conflicting_credentials(headers((name, value % "a"), (name, value % "b")))
        assert problem is not None and name in problem
        assert conflicting_credentials(headers((name, value % "a"), (name, value % "a"))) is None
    assert conflicting_credentials(headers(("authorization", "Bearer sk-a"), ("x-api-key", "sk-b"))) is None
    assert conflicting_credentials(headers()) is None
    # One key spelt twice (a proxy that re-adds the header its own way) is one key.
    assert (
        conflicting_credentials(headers(("authorization", "Bearer sk-a"), ("authorization", "bearer  sk-a "))) is None
    )


def test_the_presented_key_is_the_bearer_else_x_api_key():
    from starlette.datastructures import Headers

    def key(**h):
        return presented_key(Headers({k.replace("_", "-"): v for k, v in h.items()}))

    assert key(authorization="Bearer sk-a", x_api_key="sk-b") == "sk-a"
    assert key(authorization="bearer   sk-a ") == "sk-a"
    assert key(authorization="Basic dXNlcg==", x_api_key=" sk-b ") == "sk-b"
    assert key(authorization="Bearer ") is None and key() is None


# --- authentication and models ------------------------------------------------------------


def test_open_access_without_a_file(clock):
    keys = ApiKeys(None, clock=clock)
    assert keys.authenticate(None) is None and keys.admit(None, "openai", "gpt-4o") is None
    assert keys.prometheus() == ""


def test_missing_and_wrong_keys_are_401_invalid_api_key(tmp_path, clock):
    keys = keys_with(tmp_path, clock, entry("a", "sk-a"))
    for presented in (None, "sk-wrong"):
        denial = keys.authenticate(presented)
        assert isinstance(denial, Denial) and (denial.status, denial.code) == (401, "invalid_api_key")
    assert keys.authenticate("sk-a").id == "a"
    assert keys.failures == {"missing": 1, "invalid": 1}


def test_models_are_globs_on_provider_slash_model_or_the_bare_model(tmp_path, clock):
    keys = keys_with(tmp_path, clock, entry("a", "sk-a", models=["simulated/*", "gpt-4o*"]))
    assert keys.admit("a", "simulated", "sim-1") is None
    assert keys.admit("a", "openai", "gpt-4o-mini") is None
    denial = keys.admit("a", "anthropic", "claude-sonnet-4-5")
    assert (denial.status, denial.code) == (
        403,
        "model_not_allowed",
    ) and "anthropic/claude-sonnet-4-5" in denial.message
    assert keys.allows("a", "openai", "gpt-4o") and not keys.allows("a", "openai", "o3")
    assert keys.allows(None, "anything", "at-all")  # open access


# --- limits --------------------------------------------------------------------------------


def test_rpm_is_a_sliding_minute_with_retry_after(tmp_path, clock):
    keys = keys_with(tmp_path, clock, entry("a", "sk-a", rpm=2))
    assert keys.admit("a", "p", "m") is None
    clock.now += 10
    assert keys.admit("a", "p", "m") is None
    clock.now += 5
    denial = keys.admit("a", "p", "m")
    assert (denial.status, denial.code) == (429, "rate_limit_exceeded")
    assert denial.retry_after_s == WINDOW_S - 15  # the first admission ages out then
    clock.now += WINDOW_S - 15
    assert keys.admit("a", "p", "m") is None
    assert keys.usage["a"].outcomes == {"limited": 1}


def test_concurrency_counts_open_streams_until_they_finish(tmp_path, clock):
    keys = keys_with(tmp_path, clock, entry("a", "sk-a", concurrency=1), entry("b", "sk-b", concurrency=1))
    assert keys.admit("a", "p", "m") is None
    denial = keys.admit("a", "p", "m")
    assert denial.status == 429 and "concurrent" in denial.message and denial.retry_after_s >= 1
    assert keys.admit("b", "p", "m") is None  # another key's budget is its own
    keys.finish("a", "done", 0)
    assert keys.admit("a", "p", "m") is None


def test_tpm_is_charged_at_the_end_and_checked_before_admitting(tmp_path, clock):
    keys = keys_with(tmp_path, clock, entry("a", "sk-a", tpm=100))
    assert keys.admit("a", "p", "m") is None
    assert keys.admit("a", "p", "m") is None  # nothing charged yet
    keys.finish("a", "done", 60)
    clock.now += 20
    keys.finish("a", "done", 50)
    denial = keys.admit("a", "p", "m")
    assert denial.status == 429 and "tokens/minute" in denial.message
    assert denial.retry_after_s == WINDOW_S - 20  # when the 60 age out, 50 < 100
    clock.now += WINDOW_S - 20
    assert keys.admit("a", "p", "m") is None
    assert keys.usage["a"].tokens_total == 110


def test_tokens_come_from_usage_else_an_estimate():
    body = {"messages": [{"role": "user", "content": "x" * 40}]}
    assert stream_tokens(body, [ev.delta("hi"), ev.usage(7, 5)]) == 12
    assert stream_tokens(body, [ev.delta("hi"), ev.done("stop", {"total_tokens": 30})]) == 30
    assert stream_tokens(body, [ev.delta("y" * 20), ev.done("stop")]) == 15  # (40 + 20) / 4


def test_metrics_text_has_per_key_counters(tmp_path, clock):
    keys = keys_with(tmp_path, clock, entry("a", "sk-a", concurrency=1))
    keys.admit("a", "p", "m")
    keys.admit("a", "p", "m")  # limited
    text = keys.prometheus()
    assert 'sluice_key_requests_total{key_id="a",outcome="limited"} 1' in text
    assert 'sluice_key_open_streams{key_id="a"} 1' in text
    keys.finish("a", "done", 9)
    text = keys.prometheus()
    assert 'sluice_key_tokens_total{key_id="a"} 9' in text and 'sluice_key_open_streams{key_id="a"} 0' in text


# --- reloads ---------------------------------------------------------------------------------


def test_a_changed_file_is_reread_at_most_once_a_second(tmp_path, clock):
    path = tmp_path / "keys.json"
    keys = ApiKeys(write(path, entry("a", "sk-a")), clock=clock)
    write(path, entry("a", "sk-a"), entry("b", "sk-b-longer"))  # a different size
    clock.now += 0.5
    assert isinstance(keys.authenticate("sk-b-longer"), Denial)  # not checked yet
    clock.now += 0.6
    assert keys.authenticate("sk-b-longer").id == "b"


def test_a_bad_file_on_reload_keeps_the_old_keys(tmp_path, clock, caplog):
    path = tmp_path / "keys.json"
    keys = ApiKeys(write(path, entry("a", "sk-a", rpm=1)), clock=clock)
    keys.admit("a", "p", "m")
    path.write_text('{"keys": [{"id": "a"}]}')
    with pytest.raises(KeysFileError):
        keys.reload()
    clock.now += 2
    assert keys.authenticate("sk-a").id == "a"
    assert "previous 1 keys stay" in caplog.text and "sk-a" not in caplog.text
    assert keys.admit("a", "p", "m").status == 429  # usage survived the failed reload


def test_a_reload_keeps_usage_of_remaining_keys_and_drops_removed_ones(tmp_path, clock):
    path = tmp_path / "keys.json"
    keys = ApiKeys(write(path, entry("a", "sk-a", rpm=1), entry("b", "sk-b")), clock=clock)
    keys.admit("a", "p", "m")
    keys.admit("b", "p", "m")
    keys.finish("b", "done", 0)
    write(path, entry("a", "sk-a", rpm=1))
    keys.reload()
    assert set(keys.usage) == {"a"} and keys.admit("a", "p", "m").status == 429
    assert keys.admit("b", "p", "m").status == 401  # removed since it authenticated


# --- configuration and the coalescing key ------------------------------------------------------


def test_coalesce_scope_follows_the_keys_file():
    assert config.load({}).coalesce_scope == "global"
    assert config.load({"SLUICE_API_KEYS_FILE": "k.json"}).coalesce_scope == "key"
    assert config.load({"SLUICE_API_KEYS_FILE": "k.json", "COALESCE_SCOPE": "global"}).coalesce_scope == "global"
    with pytest.raises(config.ConfigError, match="COALESCE_SCOPE"):
        config.load({"COALESCE_SCOPE": "key"})
    with pytest.raises(config.ConfigError, match="COALESCE_SCOPE"):
        config.load({"SLUICE_API_KEYS_FILE": "k.json", "COALESCE_SCOPE": "tenant"})


def test_the_key_id_scopes_the_coalescing_key():
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert coalescing_key("p", "m", body, None, "a") != coalescing_key("p", "m", body, None, "b")
    assert coalescing_key("p", "m", body, None, "a") == coalescing_key("p", "m", body, None, "a")
    assert coalescing_key("p", "m", body) == coalescing_key("p", "m", body, None, None)


def test_the_thread_store_refuses_other_keys_threads(tmp_path):
    from actors.threads_store import ThreadNotFound, ThreadStore

    store = ThreadStore(os.path.join(tmp_path, "t.sqlite3"))
    try:
        mine, _ = store.create("a")
        store.begin(mine, "hello", "a")
        assert [m["content"] for m in store.messages(mine, "a")] == ["hello", ""]
        with pytest.raises(ThreadNotFound):
            store.messages(mine, "b")
        with pytest.raises(ThreadNotFound):
            store.begin(mine, "hello", "b")
        assert store.messages(mine)  # open access (no keys file) sees every thread
    finally:
        store.close()
