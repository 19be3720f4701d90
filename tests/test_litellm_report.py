"""The LiteLLM comparison's report writes every section from a saved results shape (no run,
no LiteLLM: a small fixture of the results dict `bench.litellm_compare` saves)."""

from __future__ import annotations

import json
import types

import pytest

from bench.litellm import report

pytestmark = pytest.mark.unit

# A few client figures per cell: the others are absent (the report shows "–" for them).
CELL_FIGURES = ("ttft_p50", "ttft_p95", "ttft_p99", "gap_p50", "gap_p95")


def cell(conc: int, round_: int, target: str) -> dict:
    figure = {"direct": 100.0, "sluice": 102.0, "litellm": 140.0}[target] + round_ + conc
    return {
        "conc": conc,
        "round": round_,
        "target": target,
        "errors": 0,
        "n": 40,
        "loadgen_cpu_s": 0.5,
        "wall_s": 8.0,
        "tokens": 4000,
        "gw_cpu_s": 2.0,
        **dict.fromkeys(CELL_FIGURES, figure),
    }


def results_fixture() -> dict:
    step = {"pass": True, "added_p95": 5.0, "errors": 0, "cells": []}
    return {
        "streams": [cell(c, r, t) for r in range(2) for c in (1, 20) for t in ("direct", "sluice", "litellm")],
        "sustain": [{"conc": 20, "direct": [{"ttft_p95": 120.0}], "sluice": step, "litellm": step | {"pass": False}}],
        "cancel": [
            {"target": t, "n": 5, "p50": 2.0, "p95": 4.0, "not_cancelled": 0, "upstream_outcomes": {"cancelled": 5}}
            for t in ("sluice", "litellm")
        ],
        "burst": [
            {"size": 1000, "target": "sluice_prod", "upstream_calls": 1, "ok": 1000, "errors": 0}
            | {"error_kinds": {}, "ttft_p95": 50.0, "wall_s": 3.0}
        ],
        "memory": {"procs": {"sluice": 9}, "peak_rss_kib": {"sluice": 2048}, "peak_pss_kib": {"sluice": 1024}},
        "idle": {"sluice": {"rss_kib": 1024, "cpu_cores": 0.01}},
        "profile": {"conc": 50, "tokens": 100, "wall_s": 2.0, "total_cpu_s": 1.0, "ttft_p95": 9.0, "procs": []},
        "cost_split": {
            "conc": 20,
            "gateways": {"sluice": {"rows": [], "cpu_ms_per_request": 1.0, "cpu_ms_per_token": 0.01}},
        },
        "incidents": [
            {"at": "10:00", "target": "litellm", "errors": 20, "cell": "c1", "conc": 20}
            | {"error_kinds": {"timeout": 20}, "probe_ok": True}
        ],
        "meta": {
            "command": ".venv/bin/python -m bench.litellm_compare",
            "date": "2026-11-28 10:00 UTC",
            "duration_min": 1.0,
            "results_file": "bench/results/litellm_compare-1.json",
            "machine": {"cpu": "cpu", "cores": 2, "mem_mib": 1, "kernel": "6", "python": "3.12"},
            "load_median": 1.0,
            "load_max": 2.0,
            "loadgen_util_max": 0.3,
            "sluice_procs": 9,
            "litellm_procs": 1,
            "versions": {"litellm": "1"},
            "litellm_spec": "litellm==1",
            "analysis": "## Analysis\n\nkept",
        },
    }


def test_every_section_is_written_in_order(tmp_path, monkeypatch):
    results = results_fixture()
    (tmp_path / "litellm_compare-1.json").write_text(json.dumps({"results": results}))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setattr(report, "DOC", tmp_path / "doc.md")
    agg = report.aggregate(results)
    results["meta"]["checks"] = report.compute_checks(results, agg)
    report.write_doc(results, agg, [], types.SimpleNamespace(quick=False, rounds=2))
    doc = (tmp_path / "doc.md").read_text()
    headings = [line.split(" (")[0] for line in doc.splitlines() if line.startswith("#")]
    assert headings == [
        "# sluice vs LiteLLM proxy vs the direct upstream",
        "## Setup",
        "## 1. Added TTFT vs concurrency",
        "## 2. Added inter-token gap p95",
        "## 3. Highest sustained concurrency",
        "## 4. Cancel latency",
        "## 5. Bursts of identical requests",
        "## 6. CPU per 1,000 streamed tokens and memory",
        "## Profile of sluice at 50 streams",
        "### Per-request vs per-token cost",
        "## Run-to-run noise",
        "## Incidents during this run",
        "## Targets",
        "## Analysis",
        "## Reproduce",
    ]
    assert "| added TTFT p95 at 20 streams | ≤ 1/10 of LiteLLM's |" in doc
    assert "| 2026-11-28 10:00 UTC (this run) |" in doc
    assert report.read_analysis() == "## Analysis\n\nkept"
