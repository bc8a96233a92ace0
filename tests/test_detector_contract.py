"""One contract over every registered detector, structural and learned.

Each kind has a fault fixture here (a test fails for a registered kind without
one): what to do to one small application's traffic, and the stage the
finding must name. The application (frontend → cart → redis, frontend → pay,
with log lines) runs for 20 minutes of event time at 4 requests a second with
lognormal latencies; faults start at minute 13, after every model's warm-up
(shortened by ``CONFIG``). Every detector, through the real pipeline:

* is quiet on the clean traffic;
* finds its own fault, on the right stage;
* is deterministic (two runs of the same input, the same findings);
* keeps bounded state under a flood of new stage names;
* has state that survives a checkpoint and a model directory, keyed by kind.
"""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Callable

import numpy as np
import pytest

from builders import MS, T0, row, sid, tid
from traceguard.assemble import EventTimeClock
from traceguard.config import PipelineConfig
from traceguard.detect import REGISTRY
from traceguard.models import store
from traceguard.pipeline import Pipeline
from traceguard.records import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, AnomalyKind, LogRow, SpanRow
from traceguard.sinks import MemorySink

MINUTES, PER_SECOND, FAULT_FROM_MIN = 20, 4, 13
SECOND_MS = 1000

CONFIG = PipelineConfig.model_validate({
    "structural": {"unpaired_min_samples": 20},
    "errors": {"min_calls": 200},
    "learned": {
        "latency": {"warmup_samples": 200, "slow_stage_min_samples": 1000},
        "structure": {"min_traces": 100},
        "forest": {"warmup_traces": 300, "reservoir": 300, "refit_every": 2000, "batch": 64},
        "templates": {"min_lines": 500},
    },
})


@dataclass
class Request:
    """One request of the application, before it becomes span rows; a fault edits it."""

    n: int
    t_ms: float
    spans: list[dict]
    logs: list[tuple[int, str]]  # (span number, body)

    def span(self, name: str) -> dict:
        return next(s for s in self.spans if s["name"] == name)

    def drop(self, name: str) -> None:
        self.spans.remove(self.span(name))


def request(n: int, t_ms: float, rng: np.random.Generator) -> Request:
    def ms(median: float) -> float:
        return float(median * rng.lognormal(0.0, 0.25))

    redis, cart = ms(2.0), ms(3.0)
    pay = ms(20.0)
    cart_end = 2 + cart + redis
    spans = [
        dict(span=1, parent=None, start=0, end=cart_end + pay + 6, kind=KIND_SERVER, service="frontend",
             name="GET /checkout"),
        dict(span=2, parent=1, start=1, end=cart_end + 1.5, kind=KIND_CLIENT, service="frontend", name="GET /cart"),
        dict(span=3, parent=2, start=1.2, end=cart_end + 1, kind=KIND_SERVER, service="cart", name="GET /cart/{id}"),
        dict(span=4, parent=3, start=2, end=2 + redis, kind=KIND_CLIENT, service="cart", name="GET",
             attrs=(("db.system", "redis"),)),
        dict(span=5, parent=1, start=cart_end + 2, end=cart_end + pay + 4, kind=KIND_CLIENT, service="frontend",
             name="POST /pay"),
        dict(span=6, parent=5, start=cart_end + 2.5, end=cart_end + pay + 3.5, kind=KIND_SERVER, service="pay",
             name="POST /pay"),
    ]
    logs = [(3, f"cart {rng.integers(10**6)} has {rng.integers(1, 9)} items"),
            (6, f"charged order {rng.integers(10**8):08x} in {int(pay)} ms")]
    return Request(n, t_ms, spans, logs)


def _one(at_min: float) -> Callable[[Request], bool]:
    """True for the one request at that minute (each per-trace fault has its own)."""
    n = int(at_min * 60 * PER_SECOND)
    return lambda r: r.n == n


def _from_fault(share: float) -> Callable[[Request], bool]:
    """True for ``share`` of the requests after the fault starts (by request number)."""
    start = FAULT_FROM_MIN * 60 * PER_SECOND
    return lambda r: r.n >= start and (r.n * 7919) % 1000 < share * 1000


def _fail_redis(r: Request) -> None:
    for span in r.spans:
        if span["name"] in ("GET", "GET /cart/{id}", "GET /cart", "GET /checkout"):
            span["status"] = STATUS_ERROR
    r.logs.append((4, "ConnectionError: Error 111 connecting to redis:6379. Connection refused."))


def _outlive(r: Request) -> None:
    r.span("GET")["end"] = r.span("GET /cart/{id}")["end"] + 300


def _slow_pay(r: Request) -> None:
    r.span("POST /pay")["end"] += 3000
    r.span("GET /checkout")["end"] += 3000
    pay = next(s for s in r.spans if s["name"] == "POST /pay" and s["kind"] == KIND_SERVER)
    pay["end"] += 3000


def _slow_redis(r: Request) -> None:
    extra = 4 * (r.span("GET")["end"] - r.span("GET")["start"])
    for span in r.spans:
        if span["name"] != "GET" and span["end"] is not None:
            span["end"] += extra
        if span["start"] > r.span("GET")["start"]:
            span["start"] += extra
    r.span("GET")["end"] += extra


def _n_plus_one(r: Request) -> None:
    cart = r.span("GET /cart/{id}")
    for i in range(40):
        r.spans.append(dict(span=100 + i, parent=3, start=2 + i * 0.01, end=2.5 + i * 0.01, kind=KIND_CLIENT,
                            service="cart", name="GET", attrs=(("db.system", "redis"),)))
    cart["end"] += 1


def _drop_pay_server(r: Request) -> None:
    r.spans = [s for s in r.spans if not (s["service"] == "pay")]


def _drop_pay_call(r: Request) -> None:
    r.spans = [s for s in r.spans if s["name"] != "POST /pay"]


@dataclass(frozen=True)
class Fault:
    applies: Callable[[Request], bool]
    edit: Callable[[Request], None]
    culprit: tuple[str, str]  # (service, operation) the finding names


FAULTS: dict[str, Fault] = {
    "missing_root": Fault(_one(14), lambda r: r.drop("GET /checkout"), ("frontend", "GET /cart")),
    "missing_parent": Fault(_one(14.5), lambda r: r.drop("GET /cart/{id}"), ("cart", "GET")),
    "unfinished_span": Fault(_one(15), lambda r: r.span("GET /cart/{id}").update(end=None), ("cart", "GET /cart/{id}")),
    "context_outlived_parent": Fault(_one(15.5), _outlive, ("cart", "GET")),
    "unpaired_client_span": Fault(_one(16), _drop_pay_server, ("frontend", "POST /pay")),
    "error_regression": Fault(_from_fault(0.3), _fail_redis, ("cart", "GET")),
    "missing_expected_span": Fault(_one(16.5), _drop_pay_call, ("frontend", "GET /checkout")),  # the root, naming it
    "slow_stage": Fault(_one(17), _slow_pay, ("pay", "POST /pay")),
    "latency_regression": Fault(_from_fault(1.0), _slow_redis, ("cart", "GET")),
    "trace_outlier": Fault(_one(17.5), _n_plus_one, ("frontend", "GET /checkout")),
    "log_anomaly": Fault(_one(18), lambda r: r.logs.append(
        (3, "java.lang.NullPointerException: Cannot invoke \"Cart.items()\" because \"cart\" is null")),
        ("cart", "GET /cart/{id}")),
}


def traffic(faults: list[Fault], *, minutes: float = MINUTES, seed: int = 1,
            rename: Callable[[int], str] | None = None) -> list[tuple[list[SpanRow], list[LogRow]]]:
    """The application's requests in time order, as (span rows, log rows), with the faults applied."""
    rng = np.random.default_rng(seed)
    out = []
    for n in range(int(minutes * 60 * PER_SECOND)):
        r = request(n, n * SECOND_MS / PER_SECOND, rng)
        for fault in faults:
            if fault.applies(r):
                fault.edit(r)
        if rename is not None:
            for span in r.spans:
                span["name"] = rename(n) + span["name"]
        rows = [row(n + 1, s["span"], s["parent"], start_ms=r.t_ms + s["start"],
                    end_ms=None if s["end"] is None else r.t_ms + s["end"], kind=s["kind"],
                    status=s.get("status", 0), service=sys.intern(s["service"]), name=sys.intern(s["name"]),
                    attrs=s.get("attrs")) for s in r.spans]
        services = {s["span"]: s["service"] for s in r.spans}
        logs = [LogRow(tid(n + 1), sid(span), T0 + int((r.t_ms + 1) * MS), 0, "", body, services[span])
                for span, body in r.logs if span in services]
        out.append((rows, logs))
    return out


def run(requests, config: PipelineConfig = CONFIG, pipeline_out: list | None = None) -> MemorySink:
    sink = MemorySink()
    pipeline = Pipeline(config, EventTimeClock(5 * SECOND_MS * MS), [sink])
    for rows, logs in requests:
        pipeline.accept_logs(logs)
        pipeline.accept_spans(rows)
        pipeline.advance()
    if pipeline_out is not None:
        pipeline_out.append(pipeline)
    pipeline.close()
    return sink


KINDS = [registration.kind.value for registration in REGISTRY]


@pytest.fixture(scope="module")
def clean():
    return run(traffic([]))


@pytest.fixture(scope="module")
def faulty():
    """Every fault at once, twice: the per-trace faults hit different requests."""
    requests = traffic(list(FAULTS.values()))
    return run(requests), run(requests)


def test_every_kind_is_registered_once_and_has_a_fault_fixture():
    assert sorted(KINDS) == sorted(FAULTS)
    assert len(set(KINDS)) == len(KINDS)
    assert set(KINDS) | {AnomalyKind.LATE_SPAN.value} == {kind.value for kind in AnomalyKind}


@pytest.mark.parametrize("kind", KINDS)
def test_quiet_on_clean_traffic(clean, kind):
    assert [a.summary for a in clean.anomalies if a.kind.value == kind] == []


def test_no_incident_on_clean_traffic(clean):
    assert clean.incidents == []


@pytest.mark.parametrize("kind", KINDS)
def test_finds_its_own_fault_on_the_right_stage(kind):
    """Alone: the fault of this kind in otherwise clean traffic."""
    sink = run(traffic([FAULTS[kind]]))
    named = {(a.service, a.operation) for a in sink.anomalies if a.kind.value == kind}
    assert FAULTS[kind].culprit in named, (kind, named, [(a.kind.value, a.service, a.operation)
                                                         for a in sink.anomalies])


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic(faulty, kind):
    first, second = ([a.model_dump_json() for a in sink.anomalies if a.kind.value == kind] for sink in faulty)
    assert first and first == second


def deep_size(root: object) -> int:
    """Bytes of everything ``root`` reaches (not classes, modules or functions)."""
    seen, stack, total = set(), [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, ModuleType, FunctionType)):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


BOUNDED = CONFIG.model_validate({
    **CONFIG.model_dump(),
    "structural": {**CONFIG.structural.model_dump(), "norm_max_stages": 50, "unpaired_max_stages": 50,
                   "norm_min_calls": 20},
    "errors": {**CONFIG.errors.model_dump(), "max_stages": 50},
    "learned": {**CONFIG.learned.model_dump(),
                "latency": {**CONFIG.learned.latency.model_dump(), "max_stages": 50, "warmup_samples": 10},
                "structure": {"min_traces": 10, "max_root_operations": 20, "max_stages_per_root": 20},
                "forest": {**CONFIG.learned.forest.model_dump(), "max_root_operations": 5, "warmup_traces": 50,
                           "reservoir": 50},
                "templates": {**CONFIG.learned.templates.model_dump(), "max_services": 5, "max_templates": 20}},
})


@pytest.fixture(scope="module")
def flooded():
    """Each detector's size after 2 and after 6 minutes of requests whose every
    operation has a new name (and every failure a new reason)."""
    sizes = []
    for minutes in (2, 6):
        pipelines: list[Pipeline] = []
        requests = traffic([], minutes=minutes, rename=lambda n: f"v{n} ")
        run(requests, BOUNDED, pipelines)
        sizes.append({d.kind.value: deep_size(d) for d in pipelines[0]._detectors})
    return sizes


@pytest.mark.parametrize("kind", KINDS)
def test_state_is_bounded(flooded, kind):
    """Three times the traffic of new names leaves a detector at most a little larger."""
    small, large = flooded[0][kind], flooded[1][kind]
    assert large <= small * 1.25 + 64 * 1024, (small, large)


@pytest.mark.parametrize("kind", KINDS)
def test_state_survives_checkpoint_and_model_directory(kind, tmp_path: Path):
    """Checkpoint and model directory carry each detector's state under its kind;
    a pipeline started from them has the same state (and saves the same files)."""
    pipelines: list[Pipeline] = []
    run(traffic([FAULTS["error_regression"]], minutes=15), CONFIG, pipelines)
    before = pipelines[0]
    checkpoint = json.loads(json.dumps(before.checkpoint()))
    assert set(checkpoint["detectors"]) <= set(KINDS)
    store.save(before.models_for_saving(), tmp_path / "before")
    after = Pipeline(CONFIG, EventTimeClock(0), [MemorySink()], models=store.load(tmp_path / "before", CONFIG.learned))
    after.restore(checkpoint)
    (old,) = [d for d in before._detectors if d.kind.value == kind]
    (new,) = [d for d in after._detectors if d.kind.value == kind]
    if hasattr(old, "state"):
        assert kind in checkpoint["detectors"]
        assert json.loads(json.dumps(new.state())) == checkpoint["detectors"][kind]
    store.save(after.models_for_saving(), tmp_path / "after")
    assert {f.name: f.read_bytes() for f in (tmp_path / "after").iterdir()} == \
        {f.name: f.read_bytes() for f in (tmp_path / "before").iterdir()}
