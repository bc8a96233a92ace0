import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest


@pytest.fixture(scope="session")
def scenario(tmp_path_factory):
    """A small labeled scenario from the generator, as OTLP/JSON lines."""
    from benchmarks.scenario import ScenarioConfig, write_scenario

    directory = tmp_path_factory.mktemp("scenario")
    write_scenario(directory, ScenarioConfig(traces=2000, seed=3, duration_s=1200, fault_rate=0.15))
    return directory


@pytest.fixture(scope="session")
def scenario_proto(tmp_path_factory):
    """The same scenario as length-prefixed OTLP protobuf."""
    from benchmarks.scenario import ScenarioConfig, write_scenario

    directory = tmp_path_factory.mktemp("scenario_proto")
    write_scenario(directory, ScenarioConfig(traces=2000, seed=3, duration_s=1200, fault_rate=0.15), proto=True)
    return directory


@pytest.fixture(scope="session")
def kafka_bootstrap():
    """The real broker scripts/test started (TEST_KAFKA_BOOTSTRAP). Without it the
    Kafka tests fail rather than skip: run them through scripts/test."""
    import os

    address = os.environ.get("TEST_KAFKA_BOOTSTRAP")
    if not address:
        pytest.fail("no Kafka broker: run the suite with scripts/test, which starts one with scripts/kafka")
    return address


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def browser():
    """Real headless Chromium (Debian's, which scripts/test finds or installs:
    TEST_CHROMIUM), driven by Playwright. Without it the browser tests fail rather than skip."""
    import os

    path = os.environ.get("TEST_CHROMIUM")
    if not path:
        pytest.fail("no Chromium: run the suite with scripts/test (scripts/chromium installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


class Page:
    """A browser tab that records script errors and saves screenshots under test-artifacts/."""

    def __init__(self, browser, prefix: str) -> None:
        self.tab = browser.new_page(viewport={"width": 1300, "height": 900})
        self.tab.set_default_timeout(120_000)  # a loaded CI machine: wait on what the page shows, generously
        self.errors: list[str] = []
        self.tab.on("pageerror", lambda error: self.errors.append(str(error)))
        self.prefix = prefix

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{self.prefix}-{name}.png"
        self.tab.screenshot(path=path, full_page=True)
        assert path.stat().st_size > 10_000
        return path


@pytest.fixture
def page_of(browser):
    pages = []

    def make(prefix: str) -> Page:
        pages.append(Page(browser, prefix))
        return pages[-1]

    yield make
    for page in pages:
        page.tab.close()
