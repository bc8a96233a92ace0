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
