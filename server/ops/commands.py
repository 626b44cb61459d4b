"""``infergate jobs``, ``deliveries`` and ``studies``: the admin API of a running
gateway as readable tables, or as JSON for scripts (``--json``)."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from datetime import datetime
from typing import Any

from tabulate import tabulate

from infergate.config import Settings
from infergate.errors import OpsClientError
from infergate.ops.client import OpsClient

_SPAN = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_time(text: str, now: float) -> float:
    """``--since``: a span back from now (``90m``, ``2h``, ``1d``) or a local time in
    ISO 8601 (``2026-12-01T08:00``)."""
    span = _SPAN.match(text.strip())
    if span:
        return now - float(span.group(1)) * _SECONDS[span.group(2)]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise OpsClientError(
            f"--since {text!r}: give a span (90m, 2h, 1d) or a time (2026-12-01T08:00)"
        ) from None


def _when(at: float | None) -> str:
    return "" if at is None else datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def _took(start: float | None, end: float | None) -> str:
    return "" if start is None or end is None else f"{end - start:.1f} s"


def _short(uid: str, keep: int = 12) -> str:
    return uid if len(uid) <= keep else uid[:keep]


def _print(value: Any, as_json: bool, table: list[list[Any]], headers: list[str]) -> None:
    if as_json:
        print(json.dumps(value, indent=2))
    elif not table:
        print("(none)")
    else:
        print(tabulate(table, headers=headers))


def jobs(
    settings: Settings,
    *,
    state: str | None,
    plugin: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> int:
    query = {"limit": str(limit)}
    if state:
        query["state"] = state
    if plugin:
        query["plugin"] = plugin
    if since:
        query["since"] = str(since_time(since, time.time()))
    found = OpsClient(settings.ops).get(f"/api/jobs?{urllib.parse.urlencode(query)}")
    rows = [
        [
            j["job_id"],
            j["plugin"] or "(forward)",
            j["state"],
            j["priority"],
            j["modality"],
            j["instances"],
            _when(j["completed_at"]),
            _took(j["started_at"], j["updated_at"]) if j["state"] in {"done", "failed"} else "",
            (j["error"] or "")[:60],
        ]
        for j in found
    ]
    headers = ["job", "plugin", "state", "priority", "mod", "inst", "queued at", "ran", "error"]
    _print(found, as_json, rows, headers)
    return 0


def job_show(settings: Settings, job_id: str, *, as_json: bool) -> int:
    detail = OpsClient(settings.ops).get(f"/api/jobs/{urllib.parse.quote(job_id)}")
    if as_json:
        print(json.dumps(detail, indent=2))
        return 0
    job = detail["job"]
    print(f"job {job['job_id']}: {job['kind']} {job['plugin']}, {job['state']}")
    if job["error"]:
        print(f"  reason: {job['error']}")
    print(f"  study {job['study_uid']}")
    print(f"  series {job['series_uid']} ({job['modality']}, {job['instances']} instances,")
    print(
        f"    sent to {job['called_ae']}), priority {job['priority']}, attempts {job['attempts']}"
    )
    if job.get("node"):
        print(f"  ran on node {job['node']}")
    # Each stage from its start to the next one's.
    marks = [
        ("receiving", job["first_received_at"], job["last_received_at"]),
        ("assembly wait", job["last_received_at"], job["completed_at"]),
        ("queued", job["completed_at"], job["started_at"]),
        ("running", job["started_at"], job["updated_at"] if job["state"] != "running" else None),
    ]
    stages = [[name, _when(start), _took(start, end)] for name, start, end in marks]
    stages += [
        [f"  {name.removesuffix('_s')}", "", f"{s:.2f} s"] for name, s in job["timings_s"].items()
    ]
    stages.append([f"ended: {job['state']}", _when(job["updated_at"]), ""])
    print()
    print(tabulate(stages, headers=["stage", "from", "for"]))
    route = detail["route"]
    if route:
        print()
        print(f"route (series completed by {route['trigger']}):")
        for decision in route["decisions"]:
            verdict = "runs" if decision["matched"] else "does not run"
            print(f"  {decision['plugin']} {verdict}: {decision['reason']}")
            for rule, lines in decision["rules"].items():
                print(f"    rule {rule}:")
                for line in lines:
                    print(f"      {line}")
    print()
    results = [[r["kind"], r["sop_instance_uid"], r["state"]] for r in detail["results"]]
    print(
        tabulate(results, headers=["result", "SOP instance UID", "state"])
        if results
        else "no results"
    )
    for delivery in detail["deliveries"]:
        print()
        print(_delivery_line(delivery))
        for item in delivery["objects"]:
            status = "" if item["status"] is None else f" 0x{item['status']:04X}"
            reason = f": {item['reason']}" if item["reason"] else ""
            print(f"    {item['kind']} {item['state']}{status}{reason}")
    return 0


def _delivery_line(d: dict[str, Any]) -> str:
    replayed = f", replayed as {d['replayed_to']}" if d["replayed_to"] else ""
    reason = f": {d['reason']}" if d["reason"] else ""
    return (
        f"delivery {d['delivery_id']} to {d['destination']}: {d['state']}, "
        f"{d['attempts']} attempt(s){replayed}{reason}"
    )


def job_retry(settings: Settings, job_id: str) -> int:
    answer = OpsClient(settings.ops).post(f"/api/jobs/{urllib.parse.quote(job_id)}/retry")
    print(f"job {answer['job_id']} is {answer['state']} again")
    return 0


def deliveries(settings: Settings, *, dead: bool, limit: int, as_json: bool) -> int:
    query = urllib.parse.urlencode({"dead": str(dead).lower(), "limit": str(limit)})
    found = OpsClient(settings.ops).get(f"/api/deliveries?{query}")
    rows = [
        [
            d["delivery_id"],
            d["destination"],
            d["state"] + (" (replayed)" if d["replayed_to"] else ""),
            d["attempts"],
            len(d["objects"]),
            _when(d["created_at"]),
            (d["reason"] or "")[:60],
        ]
        for d in found
    ]
    headers = ["delivery", "destination", "state", "tries", "objects", "created", "reason"]
    _print(found, as_json, rows, headers)
    return 0


def replay(settings: Settings, delivery_id: str | None, *, all_dead: bool, to: str | None) -> int:
    if (delivery_id is None) == (not all_dead):
        raise OpsClientError("replay takes a delivery id or --all-dead, one of the two")
    body = {} if to is None else {"to": to}
    client = OpsClient(settings.ops)
    if all_dead:
        answers = client.post("/api/deliveries/replay-dead", body)
    else:
        answers = [
            client.post(f"/api/deliveries/{urllib.parse.quote(str(delivery_id))}/replay", body)
        ]
    for answer in answers:
        print(f"delivery {answer['delivery_id']} replayed as {answer['replayed_as']}")
    if not answers:
        print("no dead letters to replay")
    return 0


def notifications(settings: Settings, *, dead: bool, limit: int, as_json: bool) -> int:
    query = urllib.parse.urlencode({"dead": str(dead).lower(), "limit": str(limit)})
    found = OpsClient(settings.ops).get(f"/api/notifications?{query}")
    rows = [
        [
            n["notification_id"],
            n["receiver"],
            n["finding"],
            n["state"],
            n["attempts"],
            _when(n["created_at"]),
            (n["reason"] or "")[:60],
        ]
        for n in found
    ]
    headers = ["notification", "receiver", "finding", "state", "tries", "created", "reason"]
    _print(found, as_json, rows, headers)
    return 0


def resend(settings: Settings, notification_id: str | None) -> int:
    if notification_id is None:
        raise OpsClientError("notifications resend takes a notification id")
    path = f"/api/notifications/{urllib.parse.quote(notification_id)}/resend"
    answer = OpsClient(settings.ops).post(path, {})
    print(f"notification {answer['notification_id']} is due again")
    return 0


def nodes(settings: Settings, *, limit: int, as_json: bool) -> int:
    """The gateway nodes sharing the running gateway's state store."""
    found = OpsClient(settings.ops).get("/api/nodes")[:limit]
    rows = [
        [
            n["node"],
            "alive" if n["alive"] else "gone",
            _when(n["heartbeat_at"]),
            _when(n["started_at"]),
            n["running_jobs"],
            n["sending_deliveries"],
            n["version"],
        ]
        for n in found
    ]
    headers = ["node", "", "last beat", "started", "jobs", "sending", "version"]
    _print(found, as_json, rows, headers)
    return 0


def forget(settings: Settings, node: str | None) -> int:
    if node is None:
        raise OpsClientError("nodes forget takes a node name")
    OpsClient(settings.ops).post(f"/api/nodes/{urllib.parse.quote(node)}/forget", {})
    print(f"node {node} is forgotten")
    return 0


def studies(settings: Settings, *, limit: int, as_json: bool) -> int:
    found = OpsClient(settings.ops).get(f"/api/studies?limit={limit}")

    def counts(by_state: dict[str, int]) -> str:
        return ", ".join(f"{n} {state}" for state, n in sorted(by_state.items()))

    rows = [
        [
            s["study_uid"],
            _when(s["last_received_at"]),
            s["series"],
            s["instances"],
            counts(s["jobs"]),
            counts(s["results"]),
        ]
        for s in found
    ]
    headers = ["study", "last received", "series", "inst", "jobs", "results"]
    _print(found, as_json, rows, headers)
    return 0
