"""Incidents: one per fault, the culprit first, per-trace findings attached, served and written."""

import json

from fastapi.testclient import TestClient

from builders import T0, row
from test_detectors import decide
from test_learned import MINUTE_MS, of_kind, stream
from traceguard.api import create_api
from traceguard.config import IncidentConfig
from traceguard.correlate import IncidentTracker
from traceguard.detect.base import finding, stage_finding
from traceguard.metrics import Metrics
from traceguard.records import KIND_CLIENT, KIND_INTERNAL, KIND_SERVER, AnomalyKind, Incident
from traceguard.sinks.sqlite import SqliteStore


def incidents_of(sink) -> dict[str, Incident]:
    """The last state of each incident."""
    return {incident.id: incident for incident in sink.incidents}


def test_stationary_traffic_opens_no_incident():
    pipeline, sink = stream(120)
    pipeline.close()
    assert sink.incidents == []
    assert all(a.incident_id is None for a in sink.anomalies)


def test_a_regression_is_one_incident_with_its_culprit_its_callers_and_its_findings():
    onset_min, end_min = 60, 90
    pipeline, sink = stream(120, db_factor=lambda m: 3.0 if onset_min <= m < end_min else 1.0)
    pipeline.close()
    (incident,) = incidents_of(sink).values()
    onset_ns = T0 + onset_min * MINUTE_MS * 10**6
    lead = incident.culprits[0]
    assert (lead.service, lead.operation, lead.span_kind) == ("api", "SELECT item", "client")
    assert [c.operation for c in incident.culprits] == ["SELECT item"]  # its callers' self time did not move
    assert {a.operation for a in incident.affected} >= {"GET /item", "lookup"}
    # never before the first affected sample, and soon after it
    assert onset_ns <= incident.onset <= onset_ns + 60 * 10**9
    assert incident.state == "resolved" and incident.resolved_at >= T0 + end_min * MINUTE_MS * 10**6
    assert incident.exemplars
    # the stage-level finding carries the incident's id
    regression = of_kind(sink, "latency_regression")
    assert regression and {a.incident_id for a in regression} == {incident.id}
    # per-trace findings during it are counted on it; only a few exemplars reach the sinks
    during = [a for a in sink.anomalies if a.trace_id and a.incident_id == incident.id]
    assert len(during) <= IncidentConfig().exemplar_findings
    assert sum(incident.attached.values()) >= len(during)
    unattached = [a for a in sink.anomalies if a.trace_id and a.incident_id is None]
    assert len(unattached) < IncidentConfig().burst, [a.summary for a in unattached]
    # one record per state change, all under one id
    assert [i.state for i in sink.incidents][-1] == "resolved" and sink.incidents[0].state == "open"


def _slow(trace, span_id: int):
    span = trace.by_id[span_id.to_bytes(8, "big")]
    return finding(AnomalyKind.SLOW_STAGE, trace.trace_id, span, detected_at=span.end, event_time=span.end,
                   severity="warning", score=0.5, summary="slow",
                   evidence={"stage_kind": "internal", "self_time_ms": 100.0, "baseline_p50_ms": 1.0})


def _request(n: int, at_ms: float):
    """gateway SERVER → gateway CLIENT → orders SERVER → orders INTERNAL 'query'."""
    return decide(
        row(n, 1, start_ms=at_ms, end_ms=at_ms + 50, kind=KIND_SERVER, service="gateway", name="GET /order"),
        row(n, 2, 1, start_ms=at_ms + 1, end_ms=at_ms + 49, kind=KIND_CLIENT, service="gateway", name="orders.Get"),
        row(n, 3, 2, start_ms=at_ms + 2, end_ms=at_ms + 48, kind=KIND_SERVER, service="orders", name="Get"),
        row(n, 4, 3, start_ms=at_ms + 3, end_ms=at_ms + 47, kind=KIND_INTERNAL, service="orders", name="query"),
    )


def _change(stage, signal, onset_ms, now_ms, state="open", magnitude=3.0):
    return stage_finding(
        AnomalyKind.LATENCY_REGRESSION if signal == "latency" else AnomalyKind.MISSING_EXPECTED_SPAN, stage,
        f"{signal}{onset_ms}", detected_at=T0 + int(now_ms * 1e6), event_time=T0 + int(onset_ms * 1e6),
        severity="warning", score=0.5, summary=signal,
        evidence={"state": state, "signal": signal, "stage_kind": ["unspecified", "internal", "server", "client"][stage[2]],
                  "magnitude": magnitude},
    )


def test_a_burst_of_slow_spans_opens_an_incident_and_two_do_not():
    written = []
    tracker = IncidentTracker(IncidentConfig(burst=3), written.append)
    traces = [_request(n, n * 1000) for n in range(3)]
    for trace in traces[:2]:
        tracker.observe(trace)
        assert tracker.route(_slow(trace, 4), trace)
    assert tracker.open_ == [] and written == []
    tracker.observe(traces[2])
    third = _slow(traces[2], 4)
    tracker.route(third, traces[2])
    (incident,) = written
    assert (incident.service, incident.operation, incident.culprits[0].signal) == ("orders", "query", "slow_spans")
    assert incident.onset == traces[0].by_id[(4).to_bytes(8, "big")].end  # the first affected sample
    assert third.incident_id == incident.id


def test_slow_spans_a_stage_always_has_open_no_incident_when_chance_brings_three_together_after_a_restart_too():
    written = []
    tracker = IncidentTracker(IncidentConfig(burst=3), written.append)
    for n in range(60):  # one slow request a minute for an hour: this stage's heavy tail
        trace = _request(n, n * 60_000)
        tracker.observe(trace)
        tracker.route(_slow(trace, 4), trace)
    tracker, hour = IncidentTracker(IncidentConfig(burst=3), written.append), tracker  # restarted
    tracker.restore(json.loads(json.dumps(hour.state())))  # as saved with the models
    bunched = [_request(n, 3_600_000 + (n - 60) * 5_000) for n in range(60, 63)]
    for trace in bunched:  # three in ten seconds: at one a minute, chance brings such bunches hourly
        tracker.observe(trace)
        tracker.route(_slow(trace, 4), trace)
    assert written == []
    for trace in bunched:  # the same three on a stage that never had one are a change
        tracker.route(_slow(trace, 3), trace)
    (incident,) = written
    assert (incident.service, incident.operation) == ("orders", "Get")


def test_a_caller_that_stopped_calling_is_affected_and_a_deeper_change_leads():
    written = []
    tracker = IncidentTracker(IncidentConfig(), written.append)
    gateway, orders, query = ("gateway", "GET /order", KIND_SERVER), ("orders", "Get", KIND_SERVER), \
        ("orders", "query", KIND_INTERNAL)
    tracker.route(_change(orders, "latency", 0, 1000))
    tracker.observe(_request(1, 2000))
    tracker.route(_change(gateway, "calls_dropped", 500, 3000))
    tracker.route(_change(("payments", "Charge", KIND_SERVER), "latency", 600, 3000))
    assert len(tracker.open_) == 2  # an unrelated service is another fault
    incident = next(i for i in written if i.service == "orders")
    assert [c.operation for c in incident.culprits] == ["Get"]
    last = [i for i in written if i.id == incident.id][-1]
    assert ("gateway", "GET /order", "calls_dropped") in {(a.service, a.operation, a.signal) for a in last.affected}
    tracker.route(_change(query, "latency", 700, 4000))  # called by the culprit: the deeper cause
    last = [i for i in written if i.id == incident.id][-1]
    assert last.culprits[0].operation == "query"
    assert last.onset == T0  # the earliest change's onset


def test_incidents_api_filters_pages_and_shows_attached_findings(tmp_path):
    store = SqliteStore(tmp_path / "anomalies.sqlite")
    pipeline, sink = stream(120, db_factor=lambda m: 3.0 if 60 <= m < 90 else 1.0)
    pipeline.close()
    for anomaly in sink.anomalies:
        store.emit(anomaly)
    for incident in sink.incidents:
        store.emit_incident(incident)
    (incident,) = incidents_of(sink).values()
    client = TestClient(create_api(store, Metrics(), lambda: True))
    page = client.get("/api/incidents").json()
    assert [i["id"] for i in page["items"]] == [incident.id] and page["next"] is None
    assert client.get("/api/incidents", params={"state": "resolved"}).json()["items"][0]["state"] == "resolved"
    assert client.get("/api/incidents", params={"state": "open"}).json()["items"] == []
    assert len(client.get("/api/incidents", params={"service": "api", "operation": "GET /item"}).json()["items"]) == 1
    assert client.get("/api/incidents", params={"service": "nobody"}).json()["items"] == []
    assert client.get("/api/incidents", params={"state": "sideways"}).status_code == 422
    detail = client.get(f"/api/incidents/{incident.id}").json()
    assert detail["culprits"][0]["operation"] == "SELECT item"
    kinds = {f["kind"] for f in detail["findings"]}
    assert "latency_regression" in kinds and all(f["incident_id"] == incident.id for f in detail["findings"])
    assert client.get("/api/incidents/0123").status_code == 404
    store.close()


def test_replay_incidents_out_one_incident_per_injected_regression(tmp_path):
    """The generator's traffic with one 3x database slowdown: through the CLI, one
    incident, the database stage first, every finding's incident id in the file."""
    from benchmarks.scenario import LatencyFault, ScenarioConfig, write_scenario
    from test_replay_cli import replay

    start, end = 1800.0, 2400.0
    config = ScenarioConfig(traces=5400, seed=5, duration_s=2700, fault_rate=0.0,
                            latency_faults=(LatencyFault("catalog", "SELECT products", start, end, 3.0),))
    write_scenario(tmp_path, config)
    findings, incidents = tmp_path / "findings.jsonl", tmp_path / "incidents.jsonl"
    result = replay(tmp_path / "traces.jsonl", "--logs", tmp_path / "logs.jsonl", "--out", findings,
                    "--incidents-out", incidents)
    assert result.returncode == 0, result.stderr
    records = [Incident.model_validate_json(line) for line in incidents.read_text().splitlines()]
    last = {r.id: r for r in records}
    assert len(last) == 1, [r.summary for r in last.values()]
    (incident,) = last.values()
    assert (incident.culprits[0].service, incident.culprits[0].operation) == ("catalog", "SELECT products")
    truth = (config.start_unix_s + start) * 10**9
    assert truth <= incident.onset <= truth + 60 * 10**9
    pointed = {json.loads(line)["incident_id"] for line in findings.read_text().splitlines()} - {None}
    assert pointed == {incident.id}
    assert "1 incidents" in result.stderr.splitlines()[0]


def _pod_scenario_incidents(tmp_path, seed: int, latency_faults: tuple, error_faults: tuple) -> tuple[dict, int]:
    """The last state of each incident of a replay of the generator with three pods per
    service and these faults (an hour, 7,200 requests); and the scenario's start, ns."""
    from benchmarks.scenario import ScenarioConfig, write_scenario
    from test_replay_cli import replay

    config = ScenarioConfig(traces=7200, seed=seed, duration_s=3600, fault_rate=0.0, pods=3,
                            latency_faults=latency_faults, error_faults=error_faults)
    write_scenario(tmp_path, config)
    incidents = tmp_path / "incidents.jsonl"
    result = replay(tmp_path / "traces.jsonl", "--logs", tmp_path / "logs.jsonl", "--out", tmp_path / "f.jsonl",
                    "--incidents-out", incidents)
    assert result.returncode == 0, result.stderr
    last = {r.id: r for r in (Incident.model_validate_json(line) for line in incidents.read_text().splitlines())}
    return last, config.start_unix_s * 10**9


def test_a_fault_on_one_pod_names_the_pod_and_a_service_wide_one_does_not(tmp_path):
    """Three pods per service: one pod of the database stage 4x slower, one pod's
    cache lookups failing half the time, then a slowdown on every pod of another
    service. One incident per fault; its culprit names the odd pod, and only
    where there is one."""
    from benchmarks.scenario import ErrorFault, LatencyFault

    last, start_ns = _pod_scenario_incidents(
        tmp_path, 4, (LatencyFault("catalog", "SELECT products", 1200, 1800, 4.0, pod=1),
                      LatencyFault("checkout", "INSERT orders", 2400, 3000, 3.0)),
        (ErrorFault("cart", "GET cart:*", 1800, 2400, 0.5, pod=2),))
    culprits = {(c.service, c.operation, c.signal): c.instance for i in last.values() for c in i.culprits}
    assert culprits[("catalog", "SELECT products", "latency")] == "catalog-1"
    assert culprits[("cart", "GET cart:*", "errors")] == "cart-2"
    assert culprits[("checkout", "INSERT orders", "latency")] is None  # every pod slowed alike
    assert any("on pod catalog-1" in i.summary for i in last.values())
    assert all(c.instance in (None, "catalog-1", "cart-2") for i in last.values() for c in i.culprits)
    # one incident per fault, each from its own onset: the frontend's "answered 500" lines in the
    # failing requests are the cart failure passed up, not an incident of their own that a later
    # fault below the frontend would join
    onsets = sorted((i.onset - start_ns) / 1e9 for i in last.values())
    assert len(onsets) == 3 and all(start <= onset <= start + 60 for onset, start in zip(onsets, (1200, 1800, 2400)))


def test_a_later_fault_below_a_caller_that_only_passed_the_first_up_is_another_incident(tmp_path):
    """The frontend's log burst about failing checkouts opens the incident of a cart
    failure before the cart's error rate is sure, and is then demoted to affected.
    A slowdown of the database under checkout ten minutes later (the frontend calls
    it, the cart does not) is a fault of its own: it does not join the cart's incident."""
    from benchmarks.scenario import ErrorFault, LatencyFault

    last, start_ns = _pod_scenario_incidents(
        tmp_path, 1, (LatencyFault("checkout", "INSERT orders", 2400, 3000, 3.0),),
        (ErrorFault("cart", "GET cart:*", 1800, 2400, 0.5, pod=2),))
    leads = sorted(((i.onset - start_ns) / 1e9, i.culprits[0].service, i.culprits[0].operation) for i in last.values())
    assert [lead[1:] for lead in leads] == [("cart", "GET cart:*"), ("checkout", "INSERT orders")]
    assert 1800 <= leads[0][0] <= 1860 and 2400 <= leads[1][0] <= 2460
