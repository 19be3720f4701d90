"""The operator artefacts in docs/ (issue 18): the Prometheus alert rules load as a rule
file (checked against the rule format's schema; `promtool check rules` is run too when it
is installed), and every metric the rules and the Grafana dashboard query is one that
`/metrics` exposes."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.metrics_logic import MetricsLogic

pytestmark = pytest.mark.unit

yaml = pytest.importorskip("yaml", reason="PyYAML (test extra) is not installed")

DOCS = pathlib.Path(__file__).parent.parent / "docs"
RULES = DOCS / "prometheus-alerts.yml"
DASHBOARD = DOCS / "grafana-dashboard.json"
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
NOW = 1_000_000.0
# what the edge appends to the Metrics actor's text (edge/app.py, edge/api_keys.py)
EDGE_FAMILIES = {
    "sluice_coalesce_scope",
    "sluice_key_requests_total",
    "sluice_key_tokens_total",
    "sluice_key_open_streams",
    "sluice_key_auth_failures_total",
}


def exposed_names() -> set[str]:
    """Every family and sample name of a /metrics that has seen each kind of record."""
    m = MetricsLogic()
    base = {"provider": "sim", "model": "m", "at": NOW}
    m.ingest(
        [
            {
                **base,
                "kind": "request",
                "request_id": "r",
                "role": "leader",
                "outcome": "error",
                "error_code": "x",
                "ttft_ms": 10.0,
                "queue_wait_ms": 1.0,
                "latency_ms": 20.0,
                "provider_ttft_ms": 5.0,
                "key_id": "k",
            },
            {
                **base,
                "kind": "upstream",
                "stream_id": "s",
                "outcome": "error",
                "error_code": "x",
                "upstream_ttft_ms": 5.0,
                "latency_ms": 9.0,
                "input_tokens": 1,
                "output_tokens": 2,
            },
            {**base, "kind": "cancel", "stream_id": "s", "cancel_ms": 3.0},
            {"kind": "retry", "provider": "sim", "reason": "429", "attempt": 2, "at": NOW},
            {"kind": "circuit", "account": "SIM", "key": "#1", "state": "open", "at": NOW},
            {"kind": "fallback", "from": "sim", "to": "openai", "reason": "circuit", "at": NOW},
        ]
        + [
            {"kind": "gauge", "name": g, "labels": {"provider": "sim"}, "value": 1, "at": NOW}
            for g in ("active_streams", "pacer_queue_depth", "pacer_tokens", "pacer_leases", "pacer_paused_seconds")
        ],
        NOW,
    )
    assert m.rejected_records == 0
    names = set(EDGE_FAMILIES)
    for fam in text_string_to_metric_families(m.prometheus(NOW)):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    return names


def metric_names(promql: str) -> set[str]:
    return set(re.findall(r"\bsluice_[a-z_]+\b", promql))


def test_alert_rules_match_the_rule_file_schema():
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"} and doc["groups"]
    names = set()
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"} and isinstance(group["name"], str)
        assert group["name"] not in names
        names.add(group["name"])
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            assert isinstance(rule["alert"], str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert DURATION.match(str(rule.get("for", "0m"))), rule["for"]
            for key in ("labels", "annotations"):
                assert all(isinstance(k, str) and isinstance(v, str) for k, v in rule.get(key, {}).items())
            assert rule["labels"]["severity"] in ("critical", "warning")
            assert rule["expr"].count("(") == rule["expr"].count(")")


def test_alert_rules_query_exposed_metrics_and_split_ttft_by_provider():
    doc = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in doc["groups"] for r in g["rules"]]
    used = set().union(*(metric_names(e) for e in exprs))
    assert used <= exposed_names(), used - exposed_names()
    by_provider = " ".join(exprs)
    assert "sluice_added_ttft_seconds_bucket" in by_provider and "sluice_provider_ttft_seconds_bucket" in by_provider


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules():
    done = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_queries_name_exposed_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    exposed = exposed_names()
    for expr in exprs:
        used = metric_names(expr)
        assert used, expr
        assert used <= exposed, (expr, used - exposed)
        assert expr.count("(") == expr.count(")"), expr
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # the panels an operator needs to say whose fault a slow first token is
    queried = " ".join(exprs)
    for name in (
        "sluice_ttft_seconds_bucket",
        "sluice_provider_ttft_seconds_bucket",
        "sluice_added_ttft_seconds_bucket",
        "sluice_upstream_tokens_total",
    ):
        assert name in queried
