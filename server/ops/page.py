"""The status page, ``GET /`` on the ops endpoint: rendered on the server by Jinja2
(autoescaped), no script, no front-end build. Read-only. What it shows comes from the
store's views and gauges: ids, states, times and reasons, no patient data."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

from infergate import __version__
from infergate.ops.health import Gateway, readiness
from infergate.store.views import DestinationView, HourView

_HOURS = 12  # the chart's span
_ENVIRONMENT = Environment(
    loader=PackageLoader("infergate.ops", "templates"),
    autoescape=select_autoescape(),
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass(frozen=True)
class Bar:
    """One hour of the chart, in the SVG's coordinates."""

    x: float
    label: str
    done_height: float
    failed_height: float
    done: int
    failed: int
    latency_y: float | None
    latency_s: float | None


_CHART_HEIGHT = 160.0
_BAR_STEP = 48.0


def chart(hours: list[HourView]) -> tuple[list[Bar], int, float]:
    """Bars of jobs ended per hour and the mean latency's points; with the scales'
    top values (jobs, seconds)."""
    top_jobs = max([h.jobs_done + h.jobs_failed for h in hours] + [1])
    top_latency = max([h.mean_latency_s or 0.0 for h in hours] + [1.0])
    bars = []
    for index, hour in enumerate(hours):
        scale = _CHART_HEIGHT / top_jobs
        bars.append(
            Bar(
                x=index * _BAR_STEP,
                label=datetime.fromtimestamp(hour.hour_start).strftime("%H:%M"),
                done_height=hour.jobs_done * scale,
                failed_height=hour.jobs_failed * scale,
                done=hour.jobs_done,
                failed=hour.jobs_failed,
                latency_y=None
                if hour.mean_latency_s is None
                else _CHART_HEIGHT - hour.mean_latency_s / top_latency * _CHART_HEIGHT,
                latency_s=hour.mean_latency_s,
            )
        )
    return bars, top_jobs, top_latency


def _when(at: float | None) -> str:
    return "" if at is None else datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def _age(at: float | None) -> str:
    return "" if at is None else f"{max(0.0, time.time() - at):.0f} s"


def _destinations(gateway: Gateway) -> list[DestinationView]:
    """Every destination deliveries went to, and every configured one besides."""
    seen = gateway.store.destination_views()
    named = {view.destination for view in seen}
    for destination in gateway.settings.destinations():
        name = destination.described
        if name not in named:
            named.add(name)
            seen.append(DestinationView(name, 0, None, 0, None, None, None))
    return seen


def status_page(gateway: Gateway) -> HTMLResponse:
    store = gateway.store
    gauges = store.pipeline_gauges()
    findings = readiness(gateway)
    bars, top_jobs, top_latency = chart(store.hourly(time.time(), _HOURS))
    html = _ENVIRONMENT.get_template("status.html").render(
        version=__version__,
        now=_when(time.time()),
        findings=findings,
        ready=all(f.ok for f in findings),
        queue=[
            (state, priority, gauges.jobs_waiting.get((state, priority), 0))
            for state in ("queued", "running")
            for priority in ("urgent", "normal")
        ],
        jobs=store.job_views(limit=20),
        dead=store.delivery_views(dead_only=True, limit=50),
        destinations=_destinations(gateway),
        oldest_undelivered=_age(gauges.oldest_undelivered_at),
        bars=bars,
        top_jobs=top_jobs,
        top_latency=top_latency,
        chart_height=_CHART_HEIGHT,
        chart_width=_BAR_STEP * _HOURS,
        polyline=" ".join(
            f"{b.x + _BAR_STEP / 2:.1f},{b.latency_y:.1f}" for b in bars if b.latency_y is not None
        ),
        when=_when,
        age=_age,
    )
    return HTMLResponse(html)


def endpoint(gateway: Gateway) -> Callable[[Request], HTMLResponse]:
    def page(request: Request) -> HTMLResponse:  # sync: Starlette runs it on a thread
        return status_page(gateway)

    return page
