"""What clients expect around the endpoints, on a real gateway configured with model
aliases, CORS origins and client keys: model names resolve through aliases on every
front end, /v1/models lists them, preflights are answered for allowed origins only, the
Anthropic SDK's x-api-key authenticates, and /v1 errors keep their API's shape."""

from __future__ import annotations

import json
import uuid

import anthropic
import openai
import pytest

from edge.api_keys import hash_key
from tests.support import get_json, request, running_gateway

pytestmark = pytest.mark.integration

KEY = "sk-routing-test"
ALLOWED = "https://app.example.com"
ALIASES = "gpt-4o=simulated/sim-4o,claude=simulated/sim-claude,fast=simulated"


@pytest.fixture(scope="module")
def gw(sim, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "routing", "sha256": hash_key(KEY)}]}))
    env = {
        "SIMULATED_BASE_URL": sim,
        "SLUICE_MODEL_ALIASES": ALIASES,
        "SLUICE_CORS_ORIGINS": ALLOWED,
        "SLUICE_API_KEYS_FILE": str(keys),
    }
    with running_gateway(env) as gateway:
        gateway.sim = sim
        yield gateway


@pytest.fixture(scope="module")
def oai(gw):
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=20) as c:
        yield c


def unique() -> str:
    return f"routing {uuid.uuid4().hex[:10]}\n#sim tokens=2"


def upstream_model(gw, text: str) -> str:
    marker = text.split("\n")[0]
    calls = [r for r in get_json(gw.sim + "/stats")[1]["requests"] if marker in json.dumps(r["body"])]
    return calls[0]["body"]["model"]


def test_aliases_route_on_every_front_end(gw, oai):
    text = unique()
    oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}])
    assert upstream_model(gw, text) == "sim-4o"
    text = unique()
    oai.responses.create(model="fast", input=text)
    assert upstream_model(gw, text) == "sim-1"  # a provider-only alias: its configured model
    text = unique()
    with anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0, timeout=20) as claude:
        message = claude.messages.create(model="claude", max_tokens=20, messages=[{"role": "user", "content": text}])
    assert message.model == "claude" and upstream_model(gw, text) == "sim-claude"


def test_models_list_and_retrieve(oai):
    ids = [m.id for m in oai.models.list().data]
    assert ids == ["simulated/sim-1", "gpt-4o", "claude", "fast"]
    assert oai.models.retrieve("gpt-4o").owned_by == "simulated"
    for accepted in ("simulated/sim-1", "sim-1", "simulated", "simulated/any-model", "fast"):
        assert oai.models.retrieve(accepted).id == accepted
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("gpt-5-unknown")
    assert info.value.body["code"] == "model_not_found" and info.value.body["type"] == "invalid_request_error"


def test_x_api_key_authenticates_the_anthropic_sdk_and_a_wrong_key_is_anthropics_401(gw):
    with anthropic.Anthropic(base_url=gw.url, api_key="sk-wrong", max_retries=0, timeout=20) as claude:
        with pytest.raises(anthropic.AuthenticationError) as info:
            claude.messages.create(model="fast", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "authentication_error"


def test_unknown_routes_and_methods_keep_their_apis_error_shape(gw):
    status, _, body = request("GET", gw.url + "/v1/no-such-route", headers={"authorization": f"Bearer {KEY}"})
    assert status == 404 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    status, _, body = request("GET", gw.url + "/v1/messages")
    assert status == 405 and json.loads(body) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "GET is not allowed on /v1/messages"},
    }
    status, _, body = request("GET", gw.url + "/v1/chat/completions")
    assert status == 405 and json.loads(body)["error"]["type"] == "invalid_request_error"


def preflight(gw, origin: str, headers: str = "authorization, content-type, x-sluice-coalesce, x-stainless-os"):
    return request(
        "OPTIONS",
        gw.url + "/v1/chat/completions",
        headers={"origin": origin, "access-control-request-method": "POST", "access-control-request-headers": headers},
    )


def test_a_preflight_from_an_allowed_origin_is_answered(gw):
    status, headers, _ = preflight(gw, ALLOWED)
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in headers["access-control-allow-methods"]
    allowed = {h.strip() for h in headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-sluice-coalesce", "x-stainless-os"} <= allowed
    status, headers, _ = request(
        "GET", gw.url + "/v1/models", headers={"origin": ALLOWED, "authorization": f"Bearer {KEY}"}
    )
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED
    assert "x-request-id" in headers["access-control-expose-headers"]


def test_other_origins_and_headers_get_no_cors_headers(gw):
    for status, headers, _ in (preflight(gw, "https://evil.example.com"), preflight(gw, ALLOWED, "x-custom-thing")):
        assert not any(h.startswith("access-control-") for h in headers)
        assert status >= 400
    status, headers, _ = request(
        "GET", gw.url + "/v1/models", headers={"origin": "https://evil.example.com", "authorization": f"Bearer {KEY}"}
    )
    assert status == 200 and "access-control-allow-origin" not in headers
    status, headers, _ = request(
        "OPTIONS", gw.url + "/api/admin/show", headers={"origin": ALLOWED, "access-control-request-method": "GET"}
    )
    assert "access-control-allow-origin" not in headers  # never the admin routes
