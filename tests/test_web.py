"""The chat page and the dashboard in a real browser (headless Chromium driven by
Playwright for Python) against the real gateway and the simulated provider.

One gateway, one simulated provider and one browser for the module; each test opens its
own browser context (its own localStorage). Screenshots go to tests/artifacts/ (git-ignored).
Skipped, with the reason, where no Chromium binary or no Playwright is found: `.ci/run`
installs Debian's `chromium`; Playwright's own browser download is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import chat_body, data_events, get_json, request, running_gateway, stream_chat, wait_until

pytestmark = pytest.mark.integration

ADMIN = "web-admin-token-0123456789"
ARTIFACTS = Path(__file__).parent / "artifacts"
TIMEOUT_MS = 30_000


def chromium_path() -> str | None:
    for candidate in (os.environ.get("SLUICE_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium binary found (apt-get install chromium; or set SLUICE_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install -e '.[test]')")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def web(sim, browser):
    with running_gateway({"SIMULATED_BASE_URL": sim, "SLUICE_ADMIN_TOKEN": ADMIN}) as gw:
        gw.sim = sim
        yield gw


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1100, "height": 760})
    ctx.set_default_timeout(TIMEOUT_MS)
    try:
        yield ctx
    finally:
        ctx.close()


def open_page(context, url: str):
    """A page with its console errors collected (a CSP violation is one)."""
    page = context.new_page()
    page.problems = []
    page.on("console", lambda msg: page.problems.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: page.problems.append(str(exc)))
    page.goto(url)
    return page


def open_chat(context, gw):
    page = open_page(context, gw.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    return page


def calls_for(gw, text: str) -> list[dict]:
    stats = get_json(gw.sim + "/stats")[1]
    return [r for r in stats["requests"] if text in json.dumps(r["body"])]


def cancellations_for(gw, text: str) -> list[dict]:
    stats = get_json(gw.sim + "/stats")[1]
    ids = {r["call_id"] for r in calls_for(gw, text)}
    return [c for c in stats["cancellations"] if c["call_id"] in ids]


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_reply(page):
    return page.locator("#messages li.assistant").last


def unique(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:12]}"


# --- pure page code, in the browser ---------------------------------------------------------

# Frames as sluice writes them, plus what other servers do: CRLF and CR line ends, comments,
# multi-line data, ids, a frame with no trailing data, UTF-8 of 2, 3 and 4 bytes.
SSE_TEXT = (
    "event: ping\ndata: {}\n\n"
    ': a comment\ndata: {"type":"meta","request_id":"r1"}\n\n'
    'data: {"type":"delta","delta":"héllo 🌊 — 日本"}\r\n\r\n'
    "event: note\rid: 7\rdata: line one\rdata: line two\r\r"
    'data:{"type":"delta","delta":"€"}\n\n'
    "event: ping\n\n"
    'data: {"type":"usage","usage":{"total_tokens":3}}\n\n'
    'data: {"type":"done","finish_reason":"stop"}\n\n'
)
SSE_EXPECTED = [
    {"event": "ping", "data": "{}", "id": ""},
    {"event": "message", "data": '{"type":"meta","request_id":"r1"}', "id": ""},
    {"event": "message", "data": '{"type":"delta","delta":"héllo 🌊 — 日本"}', "id": ""},
    {"event": "note", "data": "line one\nline two", "id": "7"},
    {"event": "message", "data": '{"type":"delta","delta":"€"}', "id": "7"},
    {"event": "ping", "data": "", "id": "7"},
    {"event": "message", "data": '{"type":"usage","usage":{"total_tokens":3}}', "id": "7"},
    {"event": "message", "data": '{"type":"done","finish_reason":"stop"}', "id": "7"},
]

PARSER_CHECK = """async (text) => {
  const { SSEParser } = await import('/static/sse.js');
  const bytes = new TextEncoder().encode(text);
  let seed = 12345;
  const rand = (n) => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; };
  const chunkings = { whole: [bytes.length] };
  for (const size of [1, 2, 3, 5, 7, 13]) chunkings['every ' + size] = Array(Math.ceil(bytes.length / size)).fill(size);
  for (let r = 0; r < 40; r++) {
    const sizes = []; let left = bytes.length;
    while (left > 0) { const s = 1 + rand(Math.min(left, 24)); sizes.push(s); left -= s; }
    chunkings['random ' + r] = sizes;
  }
  // a cut inside the 4-byte emoji, and between the \\r and the \\n of a CRLF
  const emoji = bytes.indexOf(0xF0);
  chunkings['inside emoji'] = [emoji + 2, bytes.length - emoji - 2];
  const crlf = text.indexOf('\\r\\n');
  const crlfAt = new TextEncoder().encode(text.slice(0, crlf + 1)).length;
  chunkings['between CR and LF'] = [crlfAt, bytes.length - crlfAt];
  const out = {};
  for (const [name, sizes] of Object.entries(chunkings)) {
    const parser = new SSEParser(); const events = []; let at = 0;
    for (const s of sizes) { events.push(...parser.push(bytes.slice(at, at + s))); at += s; }
    events.push(...parser.end());
    out[name] = events;
  }
  return out;
}"""


def test_sse_parser_survives_adversarial_chunkings(web, context):
    page = open_page(context, web.url + "/")
    results = page.evaluate(PARSER_CHECK, SSE_TEXT)
    assert len(results) > 40
    for name, events in results.items():
        assert events == SSE_EXPECTED, name
    # an unfinished frame at the end of the body is dropped, not delivered half
    partial = page.evaluate(
        """async () => { const { SSEParser } = await import('/static/sse.js');
        const p = new SSEParser(); const a = p.push('data: one\\n\\ndata: tw'); return [a, p.end()]; }"""
    )
    assert partial == [[{"event": "message", "data": "one", "id": ""}], []]


MARKDOWN_CHECK = """async (text) => {
  const { renderMarkdown } = await import('/static/markdown.js');
  const box = document.createElement('div');
  box.append(renderMarkdown(text));
  document.body.append(box);
  return {
    html: box.innerHTML,
    text: box.textContent,
    tags: [...box.querySelectorAll('*')].map((e) => e.tagName.toLowerCase()),
    hrefs: [...box.querySelectorAll('a')].map((a) => a.getAttribute('href')),
    handlers: [...box.querySelectorAll('*')].flatMap((e) => [...e.attributes].map((a) => a.name)).filter((n) => n.startsWith('on')),
    fired: window.__pwned === true,
  };
}"""


def test_markdown_renders_model_output_without_injection(web, context):
    page = open_page(context, web.url + "/")
    hostile = (
        '<img src=x onerror="window.__pwned=true"> <script>window.__pwned=true</script>\n\n'
        "[click](javascript:window.__pwned=true) [data](data:text/html,<b>x</b>) "
        "[ok](https://example.org/a?b=1) **bold <b>x</b>** *it* `<i>code</i>`\n\n"
        "```html\n<iframe src=javascript:alert(1)></iframe>\n```\n"
        "- one\n- two\n\n1. first\n2. second\n"
    )
    out = page.evaluate(MARKDOWN_CHECK, hostile)
    assert not out["fired"]
    assert out["handlers"] == []
    assert not {"img", "script", "iframe", "b", "i"} & set(out["tags"])
    assert out["hrefs"] == ["https://example.org/a?b=1"]  # only the http(s) link became a link
    assert '<img src=x onerror="window.__pwned=true">' in out["text"]  # shown as text
    assert "[click](javascript:window.__pwned=true)" in out["text"]
    for tag in ("strong", "em", "code", "pre", "ul", "ol", "li", "a"):
        assert tag in out["tags"], tag


def test_pages_carry_the_content_security_policy_and_load_without_errors(web, context):
    for path in ("/", "/dashboard", "/static/chat.js", "/static/app.css"):
        status, headers, _ = request("GET", web.url + path)
        assert status == 200, path
        csp = headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "'unsafe-inline'" not in csp
    assert request("GET", web.url + "/static/../app.py")[0] == 404
    assert request("GET", web.url + "/static/nothing.js")[0] == 404
    chat = open_chat(context, web)
    dashboard = open_page(context, web.url + "/dashboard")
    dashboard.wait_for_selector("body[data-snapshots]")
    assert chat.problems == [] and dashboard.problems == []
    # the page refuses an inline script (the policy is in force, not only sent)
    chat.evaluate(
        "() => { const s = document.createElement('script'); s.textContent = 'window.__inline = 1'; document.body.append(s); }"
    )
    assert chat.evaluate("() => window.__inline") is None


# --- the chat page ---------------------------------------------------------------------------


def test_reply_streams_in_before_done_and_shows_its_figures(web, context):
    page = open_chat(context, web)
    text = unique("stream")
    send(page, text + "\n#sim tokens=40 token_interval_ms=50")
    reply = last_reply(page)
    page.wait_for_function(
        "() => { const r = [...document.querySelectorAll('#messages li.assistant')].pop();"
        " return r && r.dataset.state === 'streaming' && (r.dataset.text || '').length > 0; }"
    )
    early = reply.get_attribute("data-text")
    page.wait_for_selector("#messages li.assistant[data-state='done']")
    final = reply.get_attribute("data-text")
    assert len(final.split()) == 40 and final.startswith(early) and len(early) < len(final)
    meta = reply.locator(".meta").inner_text()
    assert "TTFT" in meta and "queue wait" in meta and "leader" in meta
    assert page.locator("#thread-list button[aria-current='true']").count() == 1
    page.screenshot(path=str(ARTIFACTS / "chat.png"))
    assert page.problems == []


def test_stop_mid_stream_cancels_the_upstream_call(web, context):
    page = open_chat(context, web)
    text = unique("stop")
    send(page, text + "\n#sim tokens=500 token_interval_ms=20")
    page.wait_for_function(
        "() => { const r = [...document.querySelectorAll('#messages li.assistant')].pop();"
        " return r && (r.dataset.text || '').length > 0; }"
    )
    page.click("#stop")
    page.wait_for_selector("#messages li.assistant[data-state='stopped']")
    wait_until(lambda: cancellations_for(web, text), timeout=15, message="the simulated provider saw the cancel")
    assert len(calls_for(web, text)) == 1
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


class CuttingProxy:
    """A loopback TCP proxy in front of the gateway that cuts, once, the first connection
    whose response has carried `after` delta frames: a real network drop mid-answer (the
    browser's read fails, the gateway sees its client go)."""

    def __init__(self, target_port: int, after: int):
        self.target_port, self.after = target_port, after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.armed, self.cuts = True, 0
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            pair = [client, upstream, 0]  # the delta frames seen in this connection's responses
            with self.lock:
                self.sockets += [client, upstream]
            for src, dst, counted in ((client, upstream, None), (upstream, client, pair)):
                thread = threading.Thread(target=self._pipe, args=(src, dst, counted), daemon=True)
                self.threads.append(thread)
                thread.start()

    def _pipe(self, src: socket.socket, dst: socket.socket, pair: list | None) -> None:
        try:
            while data := src.recv(65536):
                if pair is not None and self.armed:
                    pair[2] += data.count(b'"type":"delta"')
                    with self.lock:
                        cut = self.armed and pair[2] >= self.after
                        self.armed = self.armed and not cut
                    if cut:  # this chunk never arrives: the drop loses bytes in flight too
                        self.cuts += 1
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        # shutdown wakes the accept() blocked in _accept (close alone does not, on Linux:
        # its join below waited out its whole timeout)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(timeout=10)


def test_a_network_drop_mid_answer_resumes_by_itself_and_the_text_continues_once(web, context):
    proxy = CuttingProxy(int(web.url.rsplit(":", 1)[1]), after=5)
    try:
        page = open_page(context, proxy.url + "/")
        page.wait_for_selector("body[data-ready='1']")
        text = unique("drop")
        send(page, text + "\n#sim tokens=60 token_interval_ms=30")
        page.wait_for_selector("#messages li.assistant[data-state='done']")
        reply = last_reply(page)
        assert proxy.cuts == 1 and reply.get_attribute("data-resumes") == "1"
        words = reply.get_attribute("data-text").split()
        assert len(words) == 60  # every token, none twice
        assert len(calls_for(web, text)) == 1 and cancellations_for(web, text) == []
        # Chromium logs each failed fetch: the cut itself, and a resume that came before the
        # gateway noticed the old connection go (409, retried by the page by design).
        expected = ("ERR_", "network", "409 (Conflict)")
        assert all(any(e in p or e in p.lower() for e in expected) for p in page.problems), page.problems
    finally:
        proxy.close()


def test_two_tabs_asking_the_same_at_once_share_one_upstream_call(web, context):
    first = open_chat(context, web)
    first.click("#new-thread")
    first.wait_for_selector("#thread-list button[aria-current='true']")
    second = open_chat(context, web)  # same browser storage: the same thread
    second.wait_for_selector("#thread-list button[aria-current='true']")
    text = unique("shared")
    first.fill("#prompt", text + "\n#sim ttft_ms=1500 tokens=6")
    second.fill("#prompt", text + "\n#sim ttft_ms=1500 tokens=6")
    first.press("#prompt", "Enter")
    second.press("#prompt", "Enter")
    for page in (first, second):
        page.wait_for_selector("#messages li.assistant[data-state='done']")
    answers = [last_reply(p).get_attribute("data-text") for p in (first, second)]
    assert answers[0] == answers[1] and len(answers[0].split()) == 6
    assert len(calls_for(web, text)) == 1
    roles = sorted(last_reply(p).get_attribute("data-sharing") for p in (first, second))
    assert roles == ["follower", "leader"]
    metas = [last_reply(p).locator(".meta").inner_text() for p in (first, second)]
    assert sum("shared (follower)" in meta for meta in metas) == 1
    assert sum("own upstream call (leader)" in meta for meta in metas) == 1


def test_a_provider_error_is_shown_in_place_with_the_servers_message(web, context):
    page = open_chat(context, web)
    send(page, unique("fails") + "\n#sim fail=error_mid fail_after_tokens=2")
    reply = page.locator("#messages li.assistant[data-state='error']")
    reply.wait_for()
    message = reply.locator(".error").inner_text()
    # the same message the gateway's terminal error event carries
    status, _, events = stream_chat(
        web.url + "/api/chat", chat_body(unique("fails") + "\n#sim fail=error_mid fail_after_tokens=2")
    )
    terminal = data_events(events)[-1]
    assert status == 200 and terminal["type"] == "error"
    assert terminal["message"] and terminal["message"] in message


def test_a_thread_survives_a_reload(web, context):
    page = open_chat(context, web)
    page.click("#new-thread")
    text = unique("remember me")
    send(page, text + "\n#sim tokens=5")
    page.wait_for_selector("#messages li.assistant[data-state='done']")
    answer = last_reply(page).get_attribute("data-text")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    users = page.locator("#messages li.user")
    assert users.count() == 1 and text in users.first.inner_text()
    assert last_reply(page).get_attribute("data-text") == answer
    current = page.locator("#thread-list button[aria-current='true']")
    assert current.count() == 1 and current.inner_text().startswith("remember me")


def test_the_chat_page_fits_a_phone_and_works_from_the_keyboard(web, browser):
    ctx = browser.new_context(viewport={"width": 390, "height": 800}, is_mobile=True, has_touch=True)
    ctx.set_default_timeout(TIMEOUT_MS)
    try:
        page = open_chat(ctx, web)
        assert page.evaluate("() => document.activeElement.id") == "prompt"  # type at once
        page.keyboard.type(unique("phone") + " #sim tokens=3")
        page.keyboard.press("Enter")
        page.wait_for_selector("#messages li.assistant[data-state='done']")
        assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(path=str(ARTIFACTS / "chat-phone.png"))
    finally:
        ctx.close()


# --- the dashboard ---------------------------------------------------------------------------


def card_value(page, card: str) -> str:
    return page.locator(f"#card-{card} .value").get_attribute("data-value") or ""


def test_dashboard_figures_move_after_a_burst_and_a_lowered_threshold_fires(web, context):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert request("POST", web.url + "/api/admin/metrics/reset", headers=admin)[0] == 200
    page = open_page(context, web.url + "/dashboard")
    page.wait_for_function("() => document.querySelector('#card-ttft_p50 .value').dataset.value === ''")
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(
            pool.map(
                lambda i: stream_chat(web.url + "/api/chat", chat_body(unique(f"burst {i}") + "\n#sim tokens=3")),
                range(12),
            )
        )
    assert all(status == 200 for status, _, _ in results)
    page.wait_for_function("() => document.querySelector('#card-ttft_p50 .value').dataset.value !== ''")
    assert float(card_value(page, "ttft_p50")) > 0
    wait_until(
        lambda: page.locator("#card-coalesce .extra").inner_text().endswith("/ 12"),
        timeout=15,
        message="12 leaders on the dashboard",
    )
    assert page.locator("#pacers tr[data-account='simulated']").count() == 1
    # held for 300 s by default: not firing within this test unless its threshold changes
    assert page.locator("#alerts tr[data-rule='ttft_p95_high']").get_attribute("data-state") != "firing"

    # the admin controls: token in a password field, never in the URL
    page.fill("#admin-token", ADMIN)
    page.press("#admin-token", "Enter")
    page.wait_for_selector("#admin-controls:not([hidden])")
    page.wait_for_selector("#threshold-fields input[name='ttft_p95_ms']")
    page.fill("#threshold-fields input[name='ttft_p95_ms']", "1")
    page.fill("#threshold-fields input[name='ttft_for_s']", "0")
    page.click("#thresholds-form button[type='submit']")
    page.wait_for_selector("#admin-result[data-ok='1']")
    page.wait_for_selector("#alerts tr[data-rule='ttft_p95_high'][data-state='firing']")
    assert ADMIN not in page.url
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert page.problems == []
    # leave the gateway as it was for whoever runs next
    request("POST", web.url + "/api/admin/alerts/thresholds", {"ttft_p95_ms": 1500, "ttft_for_s": 300}, admin)


def test_every_dashboard_viewer_gets_the_same_samples_from_one_sampler(web, context):
    first = open_page(context, web.url + "/dashboard")
    first.wait_for_function("() => Number(document.body.dataset.snapshots) >= 3")
    # a later viewer starts with the minutes already sampled, and then gets the very same
    # samples (one sampler per edge fans out; a sampler per viewer would stamp its own)
    second = open_page(context, web.url + "/dashboard")
    second.wait_for_selector("body[data-snapshots]")
    assert int(second.evaluate("() => document.body.dataset.snapshots")) >= 3
    wait_until(
        lambda: (
            first.evaluate("() => document.body.dataset.lastAt")
            == second.evaluate("() => document.body.dataset.lastAt")
        ),
        timeout=15,
        message="both viewers show the same sample",
    )


def test_with_client_keys_the_page_loads_without_one_and_asks_for_it(sim, browser, tmp_path):
    key = "sk-web-" + uuid.uuid4().hex
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [{"id": "web", "sha256": hashlib.sha256(key.encode()).hexdigest()}]}))
    with running_gateway({"SIMULATED_BASE_URL": sim, "SLUICE_API_KEYS_FILE": str(keys_file)}) as gw:
        ctx = browser.new_context()
        ctx.set_default_timeout(TIMEOUT_MS)
        try:
            page = open_chat(ctx, gw)  # the page itself needs no key
            send(page, unique("keyed") + " #sim tokens=3")
            page.wait_for_selector("#notice:text('enter an API key')")
            assert page.locator("#key-box").get_attribute("open") is not None
            page.fill("#api-key", key)
            page.press("#api-key", "Enter")
            send(page, unique("keyed") + " #sim tokens=3")
            page.wait_for_selector("#messages li.assistant[data-state='done']")
            assert key not in page.url
        finally:
            ctx.close()
