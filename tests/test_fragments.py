"""Fragment mode (``serve.scope = "local"``): a sidecar judges its own pod's spans of each trace.

An entry span (SERVER or CONSUMER) whose parent is in another pod is a root
of the fragment: it decides the fragment as a root would, and nothing blames
its remote parent. A local span whose local parent is missing still is a
finding, and so is a fragment whose entry span never came.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.scenario import LIVE_FAULTS, ScenarioConfig, write_scenario
from benchmarks.sidecar_fragments import sidecars, visible_labels
from builders import row
from traceguard.assemble import EventTimeClock
from traceguard.config import load_config
from traceguard.pipeline import Pipeline
from traceguard.records import KIND_CLIENT, KIND_CONSUMER, KIND_INTERNAL, KIND_SERVER
from traceguard.sinks import MemorySink

REMOTE = 99  # a span id of the caller's pod: never sent to this sidecar


def judge(*rows, scope="local"):
    sink = MemorySink()
    config = load_config(overrides={"serve.scope": scope, "learned.enabled": False}, environ={})
    pipeline = Pipeline(config, EventTimeClock(0), [sink])
    pipeline.accept_spans(list(rows))
    pipeline.close()
    return sorted(a.kind.value for a in sink.anomalies if a.trace_id)


@pytest.mark.parametrize("entry", [KIND_SERVER, KIND_CONSUMER])
def test_an_entry_span_with_a_remote_parent_is_the_fragments_root(entry):
    fragment = (row(1, 1, REMOTE, kind=entry, end_ms=100), row(1, 2, 1, end_ms=50),
                row(1, 3, 2, kind=KIND_CLIENT, end_ms=40))  # a call into another pod: its server is not here
    assert judge(*fragment) == []
    # the same spans judged as a whole trace: the root is missing
    assert judge(*fragment, scope="trace") == ["missing_root"]


def test_a_fragment_never_holds_the_servers_its_clients_called_so_no_pairing_is_judged():
    from traceguard.detect import build
    from traceguard.models import Models

    def kinds(scope):
        config = load_config(overrides={"serve.scope": scope}, environ={})
        return {d.kind.value for group in build(config, Models.new(config.learned)).values() for d in group}

    assert "unpaired_client_span" in kinds("trace") and "unpaired_client_span" not in kinds("local")


def test_a_local_parent_that_never_came_is_still_a_missing_parent():
    assert judge(row(1, 1, REMOTE, kind=KIND_SERVER, end_ms=100), row(1, 3, 2, kind=KIND_INTERNAL, end_ms=10)) \
        == ["missing_parent"]


def test_children_without_their_entry_span_are_a_request_that_never_finished_here():
    assert judge(row(1, 2, 1, kind=KIND_INTERNAL, end_ms=50), row(1, 3, 1, kind=KIND_CLIENT, end_ms=40)) \
        == ["missing_root"]


def test_local_timing_faults_are_found_in_a_fragment():
    assert judge(row(1, 1, REMOTE, kind=KIND_SERVER, end_ms=100), row(1, 2, 1, end_ms=400)) \
        == ["context_outlived_parent"]
    assert judge(row(1, 1, REMOTE, kind=KIND_SERVER, end_ms=100), row(1, 2, 1, end_ms=None)) == ["unfinished_span"]


def test_a_fragment_is_decided_when_its_entry_span_has_come_and_the_decision_wait_passed():
    """Not held until max_trace_age as a rootless trace would be: the decision reason says which."""
    decided = []
    config = load_config(overrides={"serve.scope": "local", "learned.enabled": False}, environ={})
    pipeline = Pipeline(config, EventTimeClock(0), [MemorySink()], on_decided=decided.append)
    pipeline.accept_spans([row(1, 1, REMOTE, kind=KIND_SERVER, end_ms=100), row(1, 2, 1, end_ms=50)])
    pipeline.accept_spans([row(2, 1, None, start_ms=60_000, end_ms=60_010)])  # event time moves a minute on
    pipeline.advance()
    assert [t.reason for t in decided] == ["quiet"] and decided[0].root.span_id == (1).to_bytes(8, "big")


def test_live_sidecars_one_per_service_blame_no_other_pod_and_find_their_own_faults(tmp_path):
    """The labeled scenario split by service, as each pod's exporter sends it, into one live
    ``traceguard serve`` per service (scope local, as deploy/k8s/sidecar.yaml sets it)."""
    whole = tmp_path / "whole"
    write_scenario(whole, ScenarioConfig(traces=2000, seed=8, duration_s=2000 / 3, fault_rate=0.15, cooldown_s=30,
                                         faults=LIVE_FAULTS), proto=True)
    labels = [json.loads(line) for line in (whole / "labels.jsonl").read_text().splitlines()]
    # a generous decision wait: a slow sender on a busy machine must not split a fragment
    found, blames, _ = sidecars(whole, tmp_path, True, "--decision-wait", "10s", "--max-trace-age", "60s")
    assert blames == []
    visible = visible_labels(labels)
    structural = {label for label in visible if label[0] != "missing_expected_span"}
    assert len(structural) >= 40
    assert structural <= found  # each structural fault found by the sidecar of its service
    flagged = {f for f in found if f[0] in {label[0] for label in structural}}
    assert len(flagged & structural) >= 0.95 * len(flagged)
