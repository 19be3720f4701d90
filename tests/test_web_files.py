"""The page files the edge serves (edge/web.py, edge/static/) and the dashboard's snapshot
shaping (edge/dashboard_feed.py), without a browser: what the policy forbids is not in
the files, every file a page names is shipped, alert states map to their thresholds."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from starlette.requests import Request

from edge.dashboard_feed import _alerts, _figures
from edge.web import CSP, STATIC, WebRoutes, load_static

pytestmark = pytest.mark.unit


def test_pages_have_no_inline_script_or_style_and_name_only_shipped_files():
    files = load_static()
    assert {
        "chat.html",
        "dashboard.html",
        "app.css",
        "sse.js",
        "markdown.js",
        "chat.js",
        "dashboard.js",
        "chart.js",
    } <= set(files)
    for page in ("chat.html", "dashboard.html"):
        html = files[page][0].decode()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), page  # every script is a file
        assert "<style" not in html and " style=" not in html and not re.search(r"\son\w+=", html), page
        for ref in re.findall(r'(?:src|href)="(/[^"]*)"', html):
            assert ref in ("/", "/dashboard") or ref.removeprefix("/static/") in files, ref
    for name, (content, _) in files.items():
        if name.endswith(".js"):
            code = content.decode()
            assert (
                ".innerHTML" not in code
                and "eval(" not in code
                and "http://" not in code.replace("http://www.w3.org/2000/svg", "")
            ), name
            for imported in re.findall(r'from "(/static/[^"]+)"', code):
                assert imported.removeprefix("/static/") in files


def serve(web: WebRoutes, name: str):
    request = Request(
        {"type": "http", "method": "GET", "path": f"/static/{name}", "path_params": {"name": name}, "headers": []}
    )
    return asyncio.run(web.static(request))


def test_static_files_are_served_from_the_table_only_with_the_policy():
    web = WebRoutes(edge=None, files=load_static(STATIC))
    ok = serve(web, "chat.js")
    assert ok.status_code == 200 and ok.media_type.startswith("text/javascript")
    assert ok.headers["content-security-policy"] == CSP and ok.headers["x-content-type-options"] == "nosniff"
    for name in ("../web.py", "..%2Fweb.py", "missing.js", "", ".."):
        missing = serve(web, name)
        assert missing.status_code == 404 and missing.headers["content-security-policy"] == CSP, name


def test_alert_rules_carry_their_state_figure_and_threshold():
    result = {
        "thresholds": {"ttft_p95_ms": 1.0, "ttft_for_s": 0.0, "error_rate": 0.01, "error_for_s": 0.0},
        "firing": [{"name": "ttft_p95_high", "value": 574.0, "since": 10.0, "threshold": 1.0, "summary": "s"}],
        "pending": [{"name": "error_rate_high", "value": 0.5, "since": 11.0, "threshold": 0.01, "summary": "t"}],
    }
    rules = {r["name"]: r for r in _alerts(result)["rules"]}
    assert rules["ttft_p95_high"]["state"] == "firing" and rules["ttft_p95_high"]["threshold"] == 1.0
    assert rules["ttft_p95_high"]["value"] == 574.0 and rules["ttft_p95_high"]["for_s"] == 0.0
    assert rules["error_rate_high"]["state"] == "pending"
    assert rules["queue_wait_p95_high"]["state"] == "ok" and rules["coalesce_ratio_low"]["value"] is None


def test_figures_compute_the_coalescing_ratio_only_with_leaders():
    assert _figures({"coalesce": {"leaders": 2, "followers": 7}})["coalesce"]["ratio"] == 3.5
    assert _figures({"coalesce": {"leaders": 0, "followers": 0}})["coalesce"]["ratio"] is None
    assert _figures({})["ttft_ms"] == {"p50": None, "p95": None, "count": None}


class _FullFeed:
    """A feed holding ten minutes of samples, as a gateway up for ten minutes has."""

    interval_s = 1.0

    def __init__(self):
        sample = {"at": 0.0, "alerts": {"rules": [{"name": "x" * 40, "threshold": 1.0}] * 4}, "pad": "p" * 900}
        self.history = [{**sample, "at": float(i)} for i in range(600)]
        self.queue: asyncio.Queue = asyncio.Queue()

    def subscribe(self):
        self.queue.put_nowait(None)  # the gateway stops right after the history
        return self.queue

    def unsubscribe(self, queue) -> None:
        pass


def test_the_dashboard_history_goes_out_in_frames_a_viewer_that_never_reads_holds_one_of():
    # One frame of all 600 samples (~800 KB) was buffered whole for every viewer that does
    # not read, 256 of them per address with no key needed: ~200 MB from one client. In
    # frames, the server's flow control stops each such viewer after about one frame.
    web = WebRoutes(edge=None, files={})
    web.feed = _FullFeed()

    async def frames() -> list[bytes]:
        response = await web.events(Request({"type": "http", "method": "GET", "path": "/", "headers": []}))
        return [chunk if isinstance(chunk, bytes) else chunk.encode() async for chunk in response.body_iterator]

    sent = asyncio.run(frames())
    history = [json.loads(f.split(b"data: ", 1)[1]) for f in sent if b'"type":"history"' in f.replace(b" ", b"")]
    assert len(history) > 1 and max(len(f) for f in sent) <= 128 * 1024
    assert [h.get("append", False) for h in history] == [False] + [True] * (len(history) - 1)
    assert [s["at"] for h in history for s in h["snapshots"]] == [float(i) for i in range(600)]
