"""``traceguard replay --report``: the HTML report, opened in headless Chromium.

The scenario has a 3x latency regression on catalog 'SELECT products' for 20
minutes of its hour, and structural faults for the waterfalls. The screenshot
is kept in test-artifacts/report.png.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = os.environ.get("TEST_CHROMIUM")
    if not path:
        pytest.fail("no Chromium: run the suite with scripts/test (scripts/chromium installs it)")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    from benchmarks.scenario import LatencyFault, ScenarioConfig, write_scenario

    directory = tmp_path_factory.mktemp("report")
    write_scenario(directory, ScenarioConfig(
        traces=7200, seed=5, duration_s=3600, fault_rate=0.05,
        latency_faults=(LatencyFault("catalog", "SELECT products", 1800, 3000, 3.0),)), proto=True)
    result = subprocess.run([sys.executable, "-m", "traceguard", "replay", directory / "traces.pb", "--logs",
                             directory / "logs.pb", "--out", directory / "findings.jsonl",
                             "--report", directory / "report.html"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return directory / "report.html", result.stderr


def test_the_report_is_self_contained(report):
    page = report[0].read_text()
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no network needed to open it
    assert "report written to" in report[1]


def test_chromium_renders_it_without_script_errors_with_plots_and_waterfalls(chromium, report):
    path = report[0]
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-rendered="yes"' in dom.stdout  # the page's script ran to its end
    assert "Uncaught" not in dom.stderr
    assert dom.stdout.count('class="latency-plot"') >= 1
    assert re.search(r'<line class="onset"', dom.stdout) and 'class="baseline"' in dom.stdout
    assert dom.stdout.count('class="waterfall"') == 20
    # every waterfall highlights its finding's span, but for a late span (it came after the trace was drawn)
    late = dom.stdout.count("<h3>late_span")
    assert dom.stdout.count('class="span anomalous"') == 20 - late
    assert "SELECT products" in dom.stdout and "<ul class=\"logs\">" in dom.stdout
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    subprocess.run([chromium, *flags[:3], f"--screenshot={shot}", "--window-size=1200,2400", path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
