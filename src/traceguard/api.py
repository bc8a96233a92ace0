"""The HTTP API of ``serve`` and ``consume``: the web view, incidents, findings,
kept traces, stage series, health, readiness and Prometheus metrics.

FastAPI serves the OpenAPI document at ``/openapi.json``; its Swagger and
ReDoc pages are off: they load their scripts from a CDN, so in an air-gapped
cluster they were blank pages (any OpenAPI viewer reads the document). Paging is by an opaque cursor that does not move when a finding
is updated (a resolved regression, late logs).

With a token configured, every path needs it (findings carry log bodies;
Prometheus sends it with ``authorization`` in its scrape config) except
``/healthz`` and ``/readyz``, which say nothing but up/ready and which the
kubelet probes without credentials, and the web view's page and its script
and style (``/``, ``/ui/*``), which hold no data: the page asks for the token
and sends it with each of its API calls (a browser does not send a bearer
token by itself).
"""

from __future__ import annotations

import datetime as dt
from typing import Callable, Literal

from fastapi import FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

from traceguard import __version__, web
from traceguard.auth import bearer_matches
from traceguard.config import UiConfig
from traceguard.metrics import Metrics, prometheus_text
from traceguard.models.series import StageSeries
from traceguard.records import Anomaly, AnomalyKind, Incident
from traceguard.sinks.sqlite import SqliteStore


class AnomalyPage(BaseModel):
    items: list[Anomaly]
    next: str | None


class IncidentPage(BaseModel):
    items: list[Incident]
    next: str | None


class TraceDetail(BaseModel):
    """A trace with findings: its kept spans and logs (``trace`` is null when they
    were not kept: found before they were, or past retention) and its findings."""

    trace: dict | None
    findings: list[Anomaly]


class StageDetail(BaseModel):
    """A stage's recent windows (one entry per span kind) and its newest findings."""

    series: list[dict]
    findings: list[Anomaly]


class IncidentDetail(Incident):
    """An incident with the findings stored under its id: its stage-level
    changes and the exemplar per-trace findings (the rest are counted in ``attached``)."""

    findings: list[Anomaly]


_OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
_STAGE_FINDINGS = 200  # newest findings listed on a stage page
_LARGEST = 2**63 - 1  # what SQLite's INTEGER holds
_CURSOR = r"^\d{1,18}$"  # below 2**63


def _since(value: str | None) -> int | None:
    """Unix nanoseconds, or an ISO 8601 / RFC 3339 time."""
    if value is None or value == "":
        return None
    if value.isdigit():
        nanos = int(value)
    else:
        try:
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise HTTPException(400, f"since={value!r} is neither unix nanoseconds nor an ISO 8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        nanos = int(moment.timestamp() * 1e9)
    if not 0 <= nanos <= _LARGEST:
        raise HTTPException(400, f"since={value!r} is out of range (unix nanoseconds up to {_LARGEST})")
    return nanos


def _require(store: SqliteStore | None) -> None:
    if store is None:
        raise HTTPException(404, "this instance keeps no findings store (start it with --state-dir)")


def create_api(store: SqliteStore | None, metrics: Metrics, ready: Callable[[], bool],
               token: str | None = None, series: StageSeries | None = None, ui: UiConfig | None = None) -> FastAPI:
    """``store`` None (a Kafka consumer without a state dir): the findings endpoints answer 404."""
    ui = ui or UiConfig()
    app = FastAPI(title="traceguard", version=__version__, docs_url=None, redoc_url=None,
                  description="Findings of the traceguard distributed-trace anomaly detector.")

    if token is not None:
        @app.middleware("http")
        async def authenticate(request: Request, call_next):
            path = request.url.path
            if path in _OPEN_PATHS or path.startswith("/ui/") or bearer_matches(request.headers.get("authorization"), token):
                return await call_next(request)
            metrics.inc("traceguard_api_refused_total", status="401")
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/api/incidents", response_model=IncidentPage)
    def list_incidents(
        service: str | None = Query(None, description="a culprit's or an affected stage's service"),
        operation: str | None = None,
        since: str | None = Query(None, description="unix ns or ISO 8601: incidents updated at or after"),
        state: Literal["open", "resolved"] | None = None,
        limit: int = Query(100, ge=1, le=1000),
        cursor: str | None = Query(None, pattern=_CURSOR),
    ) -> IncidentPage:
        _require(store)
        items, following = store.incidents(service=service, operation=operation, since=_since(since), state=state,
                                           limit=limit, cursor=int(cursor) if cursor else None)
        return IncidentPage(items=items, next=str(following) if following is not None else None)

    @app.get("/api/incidents/{incident_id}", response_model=IncidentDetail)
    def get_incident(incident_id: str) -> IncidentDetail:
        _require(store)
        found = store.get_incident(incident_id)
        if found is None:
            raise HTTPException(404, f"no incident {incident_id}")
        incident, findings = found
        return IncidentDetail(**incident.model_dump(), findings=findings)

    @app.get("/api/anomalies", response_model=AnomalyPage)
    def list_anomalies(
        kind: AnomalyKind | None = None,
        service: str | None = None,
        operation: str | None = None,
        trace_id: str | None = Query(None, pattern=r"^[0-9a-f]{32}$"),
        since: str | None = Query(None, description="unix ns or ISO 8601: findings detected at or after"),
        limit: int = Query(100, ge=1, le=1000),
        cursor: str | None = Query(None, pattern=_CURSOR),
        order: Literal["oldest", "newest"] = Query("oldest", description="newest: the newest first, paging back"),
    ) -> AnomalyPage:
        _require(store)
        items, following = store.query(
            kind=kind.value if kind else None, service=service, operation=operation, trace_id=trace_id,
            since=_since(since), limit=limit, cursor=int(cursor) if cursor else None, newest_first=order == "newest",
        )
        return AnomalyPage(items=items, next=str(following) if following is not None else None)

    @app.get("/api/anomalies/{anomaly_id}", response_model=Anomaly)
    def get_anomaly(anomaly_id: str) -> Anomaly:
        _require(store)
        anomaly = store.get(anomaly_id)
        if anomaly is None:
            raise HTTPException(404, f"no anomaly {anomaly_id}")
        return anomaly

    @app.get("/api/traces/{trace_id}", response_model=TraceDetail)
    def get_trace(trace_id: str = Path(pattern=r"^[0-9a-f]{32}$")) -> TraceDetail:
        _require(store)
        findings, _ = store.query(trace_id=trace_id, limit=1000)
        kept = store.trace(trace_id)
        if kept is None and not findings:
            raise HTTPException(404, f"no finding and no kept spans for trace {trace_id}")
        return TraceDetail(trace=kept, findings=findings)

    @app.get("/api/stages", response_model=StageDetail)
    def get_stage(service: str, operation: str) -> StageDetail:
        """The stage's latency and error windows (recent, in memory: empty after a restart) and its newest findings."""
        _require(store)
        findings, _ = store.query(service=service, operation=operation, limit=_STAGE_FINDINGS, newest_first=True)
        return StageDetail(series=series.of(service, operation) if series is not None else [], findings=findings)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def web_view() -> HTMLResponse:
        return HTMLResponse(web.live_page(ui))

    @app.get("/ui/{name}", include_in_schema=False)
    def web_asset(name: str) -> Response:
        asset = web.asset(name)
        if asset is None:
            raise HTTPException(404, f"no {name}")
        body, media_type = asset
        return Response(body, media_type=media_type, headers={"cache-control": "no-cache"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(response: Response) -> dict[str, str]:
        if not ready():
            response.status_code = 503
            return {"status": "starting or stopping"}
        return {"status": "ready"}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(prometheus_text(metrics), media_type="text/plain; version=0.0.4")

    return app
