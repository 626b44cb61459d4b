"""``infergate selftest``: a generated study through the running gateway, stage by stage.

It asks the gateway whether it is ready, writes synthetic series (a chest CT, a head
CT, a chest radiograph: no patient's data) for the enabled plugins that one of them
routes to, sends them with C-STORE to the gateway's own listener on its selftest AE
title (``ingest.selftest_ae_title``: every plugin, results kept on disk), waits for
their jobs and checks that each made results. With ``--destination`` it then has the
results sent to that configured destination and waits for their delivery. A progress
line per stage; exit 0 only when every stage passed.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from infergate.config import Destination, Settings
from infergate.errors import OpsClientError
from infergate.export.scu import send_objects
from infergate.ops.client import OpsClient, local_address
from infergate.plugins import discover, enabled_plugins
from infergate.routing.decide import route
from infergate.routing.facts import series_facts
from infergate.testing import (
    RIGHT_PARIETAL,
    PhantomIdentity,
    write_chest_ct,
    write_chest_radiograph,
    write_head_ct,
)

# Written into the generated series: what they are, in place of a patient.
SELFTEST_IDENTITY = PhantomIdentity(
    patient_name="INFERGATE^SELFTEST",
    patient_id="INFERGATE-SELFTEST",
    patient_birth_date="20000101",
    accession_number="SELFTEST",
)
_POLL_S = 0.5
_ENDED = {"done", "failed", "dead"}


@dataclass(frozen=True)
class Generated:
    name: str
    paths: list[Path]
    study_uid: str
    plugins: list[str]  # the enabled plugins it routes to


class SelftestFailed(Exception):  # noqa: N818 - a stage's verdict, not an error of ours
    """A stage did not pass; the message says why."""


def _say(stage: str, outcome: str) -> None:
    print(f"selftest: {stage}: {outcome}", flush=True)


def run_selftest(settings: Settings, *, destination: str | None, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    client = OpsClient(settings.ops)
    try:
        _ready(client)
        title = _selftest_title(settings)
        with tempfile.TemporaryDirectory(prefix="infergate-selftest-") as folder:
            studies = _generate(settings, Path(folder), title)
            _send(settings, title, studies)
        jobs = _wait_for_jobs(client, studies, deadline)
        if destination is not None:
            _deliver(client, jobs, destination, deadline)
    except (SelftestFailed, OpsClientError) as exc:
        _say("FAILED", str(exc))
        return 1
    _say("passed", f"{len(jobs)} job(s) made their results")
    return 0


def _selftest_title(settings: Settings) -> str:
    title = settings.ingest.selftest_ae_title
    if title is None:
        raise SelftestFailed("ingest.selftest_ae_title is not set: nowhere to send the study")
    if not settings.ingest.plain:
        raise SelftestFailed("the listener takes DICOM TLS only (ingest.plain: false)")
    return title


def _ready(client: OpsClient) -> None:
    status, body = client.probe("/readyz")
    if status != 200:
        failing = [
            f"{c['check']}: {c.get('reason', 'failing')}" for c in body["checks"] if not c["ok"]
        ]
        raise SelftestFailed(f"the gateway is not ready ({'; '.join(failing)})")
    _say("gateway ready", f"{client.base_url} ({len(body['checks'])} checks pass)")


def _generate(settings: Settings, folder: Path, title: str) -> list[Generated]:
    plugins = enabled_plugins(settings, discover())
    if not plugins:
        raise SelftestFailed("no plugin is enabled: nothing would run")
    writers = [("chest CT", _chest_ct), ("head CT", _head_ct), ("chest radiograph", _radiograph)]
    studies, covered = [], set[str]()
    enabled = settings.ingest.called_ae(title).plugins
    for name, write in writers:
        paths, study_uid = write(folder / name.replace(" ", "-"))
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        facts = series_facts(headers, "INFERGATE-TEST", title)
        decisions = route(
            facts, plugins, settings.routing.rules, None if enabled is None else frozenset(enabled)
        )
        matched = [d.plugin for d in decisions if d.matched and d.plugin not in covered]
        if matched:
            covered.update(matched)
            studies.append(Generated(name, list(paths), study_uid, matched))
            _say("generated", f"{name}, {len(paths)} instance(s), for {', '.join(matched)}")
    for loaded in plugins:
        if loaded.spec.name not in covered:
            _say("not exercised", f"{loaded.spec.name}: no generated series matches its rules")
    if not studies:
        raise SelftestFailed("no generated series routes to any enabled plugin")
    return studies


def _chest_ct(folder: Path) -> tuple[tuple[Path, ...], str]:
    written = write_chest_ct(
        folder, slices=24, size=128, pixel_spacing=2.8, identity=SELFTEST_IDENTITY
    )
    return written.paths, written.study_uid


def _head_ct(folder: Path) -> tuple[tuple[Path, ...], str]:
    # With a hyperdensity, so that a bleed model has something to segment.
    written = write_head_ct(
        folder,
        (RIGHT_PARIETAL,),
        slices=16,
        size=128,
        pixel_spacing=1.8,
        identity=SELFTEST_IDENTITY,
    )
    return written.paths, written.study_uid


def _radiograph(folder: Path) -> tuple[tuple[Path, ...], str]:
    written = write_chest_radiograph(
        folder, rows=256, columns=256, pixel_spacing=1.4, identity=SELFTEST_IDENTITY
    )
    return (written.path,), written.study_uid


def _send(settings: Settings, title: str, studies: list[Generated]) -> None:
    listener = Destination(
        ae_title=title,
        host=local_address(settings.ingest.host),
        port=settings.ingest.port,
    )
    for study in studies:
        objects = [
            (str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), p)
            for p in study.paths
        ]
        started = time.monotonic()
        outcome = send_objects(objects, listener, "INFERGATE-TEST", settings.export.timeout_s)
        refused = [o for o in outcome.objects if not o.outcome.stored]
        if outcome.failure is not None or refused:
            reason = outcome.reason or (refused[0].reason if refused else "refused")
            raise SelftestFailed(f"sending the {study.name} to {title} failed: {reason}")
        _say(
            "sent",
            f"{study.name}: {len(objects)} instance(s) to {title} at"
            f" {listener.host}:{listener.port} in {time.monotonic() - started:.1f} s",
        )


def _wait_for_jobs(
    client: OpsClient, studies: list[Generated], deadline: float
) -> list[dict[str, Any]]:
    ended: list[dict[str, Any]] = []
    for study in studies:
        jobs: list[dict[str, Any]] = []
        while True:
            jobs = client.get(f"/api/jobs?study={study.study_uid}")
            if jobs and all(j["state"] in _ENDED for j in jobs):
                break
            if time.monotonic() > deadline:
                waiting = ", ".join(f"{j['plugin']} {j['state']}" for j in jobs) or "no job yet"
                raise SelftestFailed(f"timed out waiting for the {study.name}'s jobs ({waiting})")
            time.sleep(_POLL_S)
        for job in jobs:
            detail = client.get(f"/api/jobs/{job['job_id']}")
            if job["state"] != "done":
                raise SelftestFailed(
                    f"{job['plugin']} on the {study.name}: job {job['job_id']} {job['state']}:"
                    f" {job['error']}"
                )
            kinds = [r["kind"] for r in detail["results"]]
            if not kinds:
                raise SelftestFailed(f"{job['plugin']} on the {study.name} made no results")
            timings = ", ".join(
                f"{k.removesuffix('_s')} {v:.2f} s" for k, v in job["timings_s"].items()
            )
            _say(
                f"{job['plugin']} done on the {study.name}",
                f"{', '.join(kinds)} in {job['updated_at'] - job['last_received_at']:.1f} s"
                f" after the last instance ({timings})",
            )
            ended.append(job)
    return ended


def _deliver(
    client: OpsClient, jobs: list[dict[str, Any]], destination: str, deadline: float
) -> None:
    deliveries = {
        client.post(f"/api/jobs/{job['job_id']}/send", {"to": destination})["delivery_id"]
        for job in jobs
    }
    for delivery_id in sorted(deliveries):
        while True:
            delivery = client.get(f"/api/deliveries/{delivery_id}")
            if delivery["state"] in {"delivered", "dead"}:
                break
            if time.monotonic() > deadline:
                raise SelftestFailed(
                    f"timed out waiting for delivery {delivery_id} to {destination}"
                    f" ({delivery['state']}: {delivery['reason']})"
                )
            time.sleep(_POLL_S)
        refused = [o for o in delivery["objects"] if o["state"] != "delivered"]
        if delivery["state"] == "dead" or refused:
            raise SelftestFailed(
                f"delivery to {delivery['destination']} failed: {delivery['reason']}"
            )
        _say("delivered", f"{len(delivery['objects'])} object(s) to {delivery['destination']}")
