"""The live web view of ``serve``, driven in real headless Chromium.

A real ``traceguard serve`` (token on, a Jaeger link configured, 1 s latency
and error windows so stage series fill within the test) receives the
scenario's spans over OTLP/HTTP in two halves. The browser asks for the token,
lists what was found, takes the second half's findings in without a reload,
opens a trace (its finding on its span, the link out), a span's attributes,
the stage page with its series, and a trace whose root never came (still
named by the stage it entered by). Screenshots go to test-artifacts/live-*.png.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx

from benchmarks.common import scenario_requests
from benchmarks.serve_process import ServeProcess

TOKEN = "s3cret-web"
ENV = {"TRACEGUARD_SERVE__TOKEN": TOKEN, "TRACEGUARD_UI__TRACE_LINK": "http://jaeger.example/trace/{trace_id}",
       "TRACEGUARD_UI__REFRESH": "1s", "TRACEGUARD_LEARNED__LATENCY__WINDOW": "1s",
       "TRACEGUARD_ERRORS__WINDOW": "1s"}


def _send(server: ServeProcess, bodies: list[bytes]) -> None:
    for body in bodies:
        httpx.post(f"http://127.0.0.1:{server.http}/v1/traces", content=body, timeout=60,
                   headers={"content-type": "application/x-protobuf",
                            "authorization": f"Bearer {TOKEN}"}).raise_for_status()


def test_the_live_view_lists_findings_updates_itself_and_opens_traces_and_stages(tmp_path, page_of):
    # faults from the 1,000th request (the warm-up) to the last 300 s (the cool-down): in both halves
    bodies = [r.SerializeToString() for r in scenario_requests(3000, seed=3, fault_rate=0.15)]
    half = len(bodies) // 2
    server = ServeProcess(tmp_path / "state", "--decision-wait", "1s", "--max-trace-age", "3s", env=ENV)
    try:
        _send(server, bodies[:half])
        first = server.wait_for(lambda: len(server.anomalies()), timeout=300, what="the first findings")
        page = page_of("live")
        tab = page.tab
        tab.goto(f"http://127.0.0.1:{server.api}/")
        tab.wait_for_selector("form#token")  # the page holds no data; the API wants the token
        page.shot("token")
        tab.fill("form#token input", "not-the-token")
        tab.click("form#token button")
        tab.wait_for_function("() => document.getElementById('status').textContent === 'the API refused this token'")
        tab.fill("form#token input", TOKEN)
        # two refreshes while the token is typed in: they must leave the form (and what is in it) alone
        updates = int(tab.get_attribute("body", "data-updates"))
        tab.wait_for_function("n => Number(document.body.dataset.updates) >= n", arg=updates + 2)
        tab.click("form#token button")
        tab.wait_for_selector("tr.finding")
        tab.evaluate("window.notReloaded = true")
        shown = tab.locator("tr.finding").count()
        assert shown >= first
        page.shot("home")

        _send(server, bodies[half:])
        total = server.wait_for(lambda: (n := len(server.anomalies())) > first and n, timeout=300,
                                what="the second half's findings")
        tab.wait_for_function("n => document.querySelectorAll('tr.finding').length >= n", arg=min(total, 200))
        assert tab.evaluate("window.notReloaded") is True  # polled in, not reloaded

        # the newest finding on a span of a trace whose root came (the page lists the newest first; some
        # kinds name no span; a rootless trace's entry may be a CLIENT span, whose time is the network's)
        newest = server.client.get("/api/anomalies", params={"order": "newest", "limit": 200}).json()["items"]

        def rooted(trace_id: str) -> bool:
            kept = server.client.get(f"/api/traces/{trace_id}").json().get("trace") or {"spans": []}
            return any(not s["parent_span_id"] for s in kept["spans"])

        on_span = next(f for f in newest if f["span_id"] and rooted(f["trace_id"]))
        tab.click(f'tr.finding a.trace[href="#/trace/{on_span["trace_id"]}"] >> nth=0')
        tab.wait_for_selector(".waterfall .row.anomalous")
        trace_id = tab.url.rsplit("/", 1)[1]
        assert tab.get_attribute("a.linkout", "href") == f"http://jaeger.example/trace/{trace_id}"
        tab.click(".waterfall .row.anomalous >> nth=0")
        assert "span id" in tab.wait_for_selector(".waterfall .detail").inner_text()
        page.shot("trace")

        tab.click("h1 + p a.stage")  # the trace's root stage
        tab.wait_for_selector("svg.plot polyline.p50", state="attached")
        page.shot("stage")

        # a trace whose root never came still names the stage it entered by: the earliest span without a parent
        lost = server.anomalies(kind="missing_root")[0]
        tab.goto(f"http://127.0.0.1:{server.api}/#/trace/{lost['trace_id']}")
        entry = tab.wait_for_selector("h1 + p a.stage").get_attribute("href")
        spans = httpx.get(f"http://127.0.0.1:{server.api}/api/traces/{lost['trace_id']}",
                          headers={"authorization": f"Bearer {TOKEN}"}).raise_for_status().json()["trace"]["spans"]
        seen = {s["span_id"] for s in spans}
        earliest = min((s for s in spans if s["parent_span_id"] not in seen), key=lambda s: s["start"])
        assert entry == f"#/stage/{quote(earliest['service'], safe='')}/{quote(earliest['name'], safe='')}"
        assert not page.errors
    finally:
        assert server.stop(timeout=120) == 0
