"""Fragment mode: the labeled scenario through one sidecar per service, each seeing only its own spans.

The scenario's export requests are split by ``service.name`` (as each pod's
exporter would send them) and each service's share is replayed by its own
pipeline with ``serve.scope = "local"`` (event time, so the run is
deterministic; ``serve`` uses the same pipeline). Then:

* **blames of another pod**: findings that name a span as missing
  (``missing_parent``, ``missing_root``) although that span was exported by
  some service: it was only elsewhere. Must be 0.
* **precision and recall per kind** over the faults a sidecar can see: each
  per-trace label belongs to the sidecar of the service its fault is in; an
  ``exporter_drop`` (the callee's exporter drops its spans) is visible to no
  sidecar, so its labels are left out. A finding counts in its own sidecar.
* the same scenario replayed whole (``scope = "trace"``) for comparison.

``--live``: each service's share goes instead to its own ``traceguard serve``
process (``TRACEGUARD_SERVE__SCOPE=local``, as ``deploy/k8s/sidecar.yaml``
sets it) over OTLP/HTTP, as that pod's exporter would send it: its export
requests and log requests in their order, all sidecars at once, on the wall
clock with the default decision wait. A late export is late only in the
generator's time (sent at once, it is not late), so the scenario then places
every fault but that one (``LIVE_FAULTS``). Findings are read from each sidecar's
JSONL output once it has decided everything and stopped.

Run ``python -m benchmarks.sidecar_fragments [--traces N] [--seed S] [--fault-rate F] [--live]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from benchmarks.common import last_versions
from benchmarks.kafka_feed import read_length_prefixed
from benchmarks.quality import STRUCTURAL_KINDS, every_finding, subject
from benchmarks.scenario import FAULTS, LIVE_FAULTS, ScenarioConfig, length_prefixed, write_scenario
from benchmarks.serve_process import ServeProcess
from traceguard.config import load_config
from traceguard.replay import run_replay
from traceguard.sinks import MemorySink

INVISIBLE = frozenset({"exporter_drop"})  # the faulty pod sends nothing: no sidecar sees it
KINDS = (*(k for k in STRUCTURAL_KINDS if k != "unpaired_client_span"), "missing_expected_span")
BLAMING = ("missing_parent_span_id", "missing_root_span_id")


def _service(resource) -> str:
    return next((a.value.string_value for a in resource.attributes if a.key == "service.name"), "")


def split(directory: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    """Per-service traces.pb and logs.pb under ``out/<service>/``; the services, and each
    exported span's service (hex span id → service)."""
    files: dict[tuple[str, str], object] = {}
    exported: dict[str, str] = {}

    def write(service: str, name: str, message) -> None:
        handle = files.get((service, name))
        if handle is None:
            (out / service).mkdir(parents=True, exist_ok=True)
            handle = files[(service, name)] = open(out / service / name, "wb")
        handle.write(length_prefixed(message))

    for request in read_length_prefixed(directory / "traces.pb", ExportTraceServiceRequest):
        by_service = defaultdict(ExportTraceServiceRequest)
        for resource_spans in request.resource_spans:
            service = _service(resource_spans.resource)
            by_service[service].resource_spans.append(resource_spans)
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    exported[span.span_id.hex()] = service
        for service, request in by_service.items():
            write(service, "traces.pb", request)
    for request in read_length_prefixed(directory / "logs.pb", ExportLogsServiceRequest):
        by_service = defaultdict(ExportLogsServiceRequest)
        for resource_logs in request.resource_logs:
            by_service[_service(resource_logs.resource)].resource_logs.append(resource_logs)
        for service, request in by_service.items():
            write(service, "logs.pb", request)
    for handle in files.values():
        handle.close()
    return sorted({service for service, _ in files}), exported


def replay(traces: Path, logs: Path, scope: str) -> list:
    sink = MemorySink()
    config = every_finding(load_config(overrides={"serve.scope": scope}, environ={}))
    run_replay([traces], [logs] if logs.exists() else [], config, [sink], warn=lambda _: None)
    return sink.anomalies


def serve_live(share: Path, state: Path, *args: str) -> list:
    """One service's share through a live sidecar (``args``: more ``serve`` flags); its
    findings, the last version of each."""
    out = state / "findings.jsonl"
    server = ServeProcess(state, *args, env={"TRACEGUARD_SERVE__SCOPE": "local",
                                             "TRACEGUARD_SERVE__JSONL_OUT": str(out),
                                             "TRACEGUARD_INCIDENTS__EXEMPLAR_FINDINGS": str(10**9)})
    try:
        def send(name: str, path: str, message) -> None:
            if not (share / name).exists():
                return
            with httpx.Client(base_url=f"http://127.0.0.1:{server.http}", timeout=60) as client:
                for request in read_length_prefixed(share / name, message):
                    client.post(path, content=request.SerializeToString(),
                                headers={"content-type": "application/x-protobuf"}).raise_for_status()

        senders = [threading.Thread(target=send, args=signal) for signal in
                   (("traces.pb", "/v1/traces", ExportTraceServiceRequest),
                    ("logs.pb", "/v1/logs", ExportLogsServiceRequest))]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        server.wait_for(lambda: server.metric("traceguard_traces_in_flight") == 0, timeout=600,
                        what=f"{share.name}'s sidecar to decide every trace")
        lost = server.metric("traceguard_traces_evicted_total") + server.metric("traceguard_traces_abandoned_total")
    finally:
        assert server.stop(timeout=120) == 0
    assert lost == 0, f"{share.name}'s sidecar decided {lost} traces early or not at all"
    return list(last_versions(out).values())


def sidecars(whole: Path, work: Path, live: bool, *serve_args: str) -> tuple[set, list, dict]:
    """The scenario in ``whole`` split by service and judged by one sidecar each (in-process
    replays, or ``live`` processes, all at once): the per-trace findings as (kind, trace,
    span, sidecar), the blames of another pod, and each sidecar's count of findings."""
    services, exported = split(whole, work / "pods")
    if live:
        with ThreadPoolExecutor(len(services)) as pool:
            by_service = dict(zip(services, pool.map(
                lambda service: serve_live(work / "pods" / service, work / "state" / service, *serve_args),
                services)))
    else:
        by_service = {service: replay(work / "pods" / service / "traces.pb", work / "pods" / service / "logs.pb",
                                      "local") for service in services}
    found, blames, per_pod = set(), [], {}
    for service, anomalies in by_service.items():
        per_pod[service] = len([a for a in anomalies if a.trace_id])
        for anomaly in anomalies:
            if anomaly.trace_id is None:
                continue
            found.add((*subject(anomaly), service))
            missing = next((anomaly.evidence[k] for k in BLAMING if k in anomaly.evidence), None)
            if missing is not None and missing in exported:
                blames.append({"sidecar": service, "kind": anomaly.kind.value, "trace_id": anomaly.trace_id,
                               "names_as_missing": missing, "exported_by": exported[missing]})
    return found, blames, per_pod


def visible_labels(labels: list[dict]) -> set:
    """The per-trace labels a sidecar can see, as (kind, trace, span, the service of the fault)."""
    return {(label["kind"], label["trace_id"], label["span_id"], label["service"]) for label in labels
            if label["trace_id"] and label["kind"] in KINDS and label["fault"] not in INVISIBLE}


def table(found: set, truth: set) -> dict:
    out = {}
    for kind in KINDS:
        f, t = {x for x in found if x[0] == kind}, {x for x in truth if x[0] == kind}
        hits = len(f & t)
        out[kind] = {"labels": len(t), "findings": len(f), "true_positives": hits,
                     "precision": round(hits / len(f), 4) if f else (1.0 if not t else 0.0),
                     "recall": round(hits / len(t), 4) if t else 1.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fault-rate", type=float, default=ScenarioConfig.fault_rate,
                        help="share of requests with a structural fault (the labeled scenario's default)")
    parser.add_argument("--live", action="store_true", help="one live `traceguard serve` per service (OTLP/HTTP)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole"
        write_scenario(whole, ScenarioConfig(traces=args.traces, seed=args.seed, duration_s=args.traces / 3,
                                             fault_rate=args.fault_rate,
                                             faults=LIVE_FAULTS if args.live else tuple(FAULTS)), proto=True)
        labels = [json.loads(line) for line in (whole / "labels.jsonl").read_text().splitlines()]
        found, blames, per_pod = sidecars(whole, Path(tmp), args.live)
        whole_found = {subject(a) for a in replay(whole / "traces.pb", whole / "logs.pb", "trace") if a.trace_id}
    visible = visible_labels(labels)
    fault_of = {(label["kind"], label["trace_id"], label["span_id"], label["service"]): label["fault"] for label in labels
                if label["trace_id"]}
    missed: dict[str, int] = defaultdict(int)
    for key in visible - found:
        missed[f"{key[0]} ({fault_of[key]}, {key[3]})"] += 1
    every = {(label["kind"], label["trace_id"], label["span_id"]) for label in labels
             if label["trace_id"] and label["kind"] in KINDS}
    missed_whole: dict[str, int] = defaultdict(int)
    for key in {k for k in visible if k[:3] not in whole_found}:
        missed_whole[f"{key[0]} ({fault_of[key]}, {key[3]})"] += 1
    print(json.dumps({
        "benchmark": "sidecar_fragments", "live": args.live, "traces": args.traces, "seed": args.seed,
        "fault_rate": args.fault_rate,
        "sidecars": sorted(per_pod),
        "per_trace_findings_per_sidecar": per_pod,
        "blames_of_another_pod": len(blames), "blames_first": blames[:5],
        "labels_visible_locally": len(visible),
        "labels_left_out_as_invisible": sum(1 for label in labels if label["fault"] in INVISIBLE and label["trace_id"]),
        "local": table(found, visible),
        "missed_locally": dict(sorted(missed.items())),
        "the_same_labels_missed_whole_trace": dict(sorted(missed_whole.items())),
        "whole_trace_same_kinds": table(whole_found, every),
    }, indent=1))


if __name__ == "__main__":
    main()
