"""``traceguard replay --report``: the web view's pages in one file, driven in headless Chromium.

The scenario has a 3x latency regression on catalog 'SELECT products' for 20
minutes of its hour, and structural faults. The test clicks through as an
engineer would: the incident, an exemplar trace with the culprit marked, a
flagged trace and a span's attributes, the culprit's stage page with its
series, baseline and onset. Screenshots are kept in test-artifacts/report-*.png.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    from benchmarks.scenario import LatencyFault, ScenarioConfig, write_scenario

    directory = tmp_path_factory.mktemp("report")
    write_scenario(directory, ScenarioConfig(
        traces=7200, seed=5, duration_s=3600, fault_rate=0.05,
        latency_faults=(LatencyFault("catalog", "SELECT products", 1800, 3000, 3.0),)), proto=True)
    result = subprocess.run([sys.executable, "-m", "traceguard", "replay", directory / "traces.pb", "--logs",
                             directory / "logs.pb", "--out", directory / "findings.jsonl",
                             "--report", directory / "report.html"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return directory / "report.html", result.stderr


def _data(page: str) -> dict:
    settings = re.search(r"<script>window.TRACEGUARD = (.*?);</script>", page).group(1)
    return json.loads(settings.replace("<\\/", "</"))["data"]


def test_the_report_is_self_contained_and_bounded(report):
    page = report[0].read_text()
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no network needed to open it
    assert "report written to" in report[1]
    data = _data(page)
    per_trace = [f for f in data["findings"] if f["trace_id"]]
    assert len(per_trace) == 300 < sum(data["counts"].values())  # the most severe kept, the rest counted
    assert all(f["trace_id"] in data["traces"] for f in per_trace if f["kind"] != "late_span")
    assert [s["operation"] for s in data["series"] if s["service"] == "catalog"].count("SELECT products") == 1


def test_an_engineer_walks_from_the_incident_to_its_traces_and_its_stage(report, page_of):
    page = page_of("report")
    tab = page.tab
    tab.goto(report[0].as_uri())
    tab.wait_for_selector("body[data-rendered=yes]")
    incidents = tab.locator("tr.incident")
    assert incidents.count() == 1 and "SELECT products" in incidents.inner_text()
    page.shot("home")

    tab.click("tr.incident a[href^='#/incident/']")
    tab.wait_for_selector("tr.culprit")
    assert "catalog 'SELECT products'" in tab.inner_text("tr.culprit")
    assert tab.locator("tr.affected").count() >= 2
    page.shot("incident")

    tab.click("ul.exemplars a.trace >> nth=0")
    culprit = tab.wait_for_selector(".waterfall .row.culprit")
    assert "SELECT products" in culprit.inner_text() and "incident culprit" in culprit.inner_text()
    assert tab.locator(".waterfall .tick").count() >= 3  # a time axis
    assert re.search(r"\d+(\.\d+)? ms", tab.inner_text(".waterfall .row.culprit .duration"))
    page.shot("exemplar-trace")

    tab.click("p.exemplar a")
    tab.click("tr.culprit a.stage")
    tab.wait_for_selector("svg.plot polyline.p95", state="attached")
    assert tab.locator("svg.plot rect.baseline").count() == 1
    assert tab.locator("svg.plot line.onset").count() == 1
    assert "latency_regression" in tab.inner_text("table.findings")
    page.shot("stage")
    assert not page.errors


def test_a_flagged_trace_shows_its_finding_on_its_span_with_ghosts_and_attributes(report, page_of):
    page = page_of("report")
    tab = page.tab
    tab.goto(report[0].as_uri() + "#/?kind=missing_expected_span")
    tab.wait_for_selector("tr.finding")
    assert {tab.locator("tr.finding").nth(i).get_attribute("data-kind")
            for i in range(tab.locator("tr.finding").count())} == {"missing_expected_span"}
    tab.click("tr.finding a.trace >> nth=0")
    # the stage every normal trace of this request has, drawn where it should have been
    tab.wait_for_selector(".waterfall .row.ghost:has-text('(missing)')")
    anomalous = tab.locator(".waterfall .row.anomalous:has-text('missing_expected_span')")
    assert anomalous.count() == 1  # the finding's span (the root) is marked with its kind
    anomalous.click()
    detail = tab.wait_for_selector(".waterfall .detail")
    assert "span id" in detail.inner_text()
    page.shot("flagged-trace")
    assert not page.errors
