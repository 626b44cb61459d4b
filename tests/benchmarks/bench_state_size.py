"""What the state takes in PostgreSQL and in SQLite, per instance and per study.

``--studies`` studies of ``--instances`` instances each go through the store as a
gateway records them: the instances in groups as ingest commits them, one series
completed with one job, the job done with a SEG and an SR, their delivery planned,
sent and delivered, one association audited. UIDs are pydicom's (as long as real
ones), spool paths as the spool names them. Reported: bytes per instance and per
study (tables and indexes), after VACUUM on PostgreSQL, on a file checkpointed on
SQLite; what retention keeps (``retention.keep_days`` of studies) is then the size.

    .venv/bin/python tests/benchmarks/bench_state_size.py [--studies 20] [--instances 300]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
from postgres import start_postgres
from pydicom.uid import generate_uid

from infergate.config import Settings
from infergate.store import AssociationAudit, DeliveryItem, InstanceRecord, NewJob, ResultRow, Store
from infergate.work.states import DeliveryState, JobKind, ResultKind, ResultState

GROUP = 8  # instances a commit, as ingest groups them under load


def _instance(study: str, series: str, association: str, spool: Path) -> InstanceRecord:
    return InstanceRecord(
        str(generate_uid()), "1.2.840.10008.5.1.4.1.1.2", series, study, "CT",
        spool / "instances" / f"{uuid.uuid4().hex}.dcm", 526_000, association,
        "CT_SCANNER_2", "INFERGATE", uuid.uuid4().hex + uuid.uuid4().hex,
    )  # fmt: skip


def _fill(store: Store, studies: int, instances: int, spool: Path) -> None:
    settings = Settings.model_validate(
        {"export": {"destination": {"ae_title": "PACS", "host": "pacs.example.org", "port": 104}}}
    )
    destination = settings.export.destination
    assert destination is not None
    at = 1_764_633_600.0
    for number in range(studies):
        study, series, association = str(generate_uid()), str(generate_uid()), uuid.uuid4().hex
        records = [_instance(study, series, association, spool) for _ in range(instances)]
        for start in range(0, instances, GROUP):
            store.record_instances(records[start : start + GROUP], now=at)
        audit = AssociationAudit(
            association, "10.1.2.3", 40000 + number, "CT_SCANNER_2", "INFERGATE", False,
            "accepted", None, at, node="node-0",
        )  # fmt: skip
        store.admit(audit, lambda *_: None, at)
        (row,) = [s for s in store.receiving_series() if s.series_uid == series]
        job_id = uuid.uuid4().hex
        route = '{"trigger": "quiet", "decisions": [{"plugin": "ct_lung", "runs": true}]}'
        store.complete_series(row, [NewJob(job_id, JobKind.INFERENCE, "ct_lung", route=route)], at)
        store.start_job(job_id, at + 1, "node-0")
        results = [
            ResultRow(str(generate_uid()), job_id, kind, spool.parent / "results" / job_id / name)
            for kind, name in ((ResultKind.SEG, "seg.dcm"), (ResultKind.SR, "sr.dcm"))
        ]
        timings = {"volume_s": 0.6, "model_s": 4.6, "encode_s": 1.2, "write_s": 0.3}
        store.finish_job(job_id, results, at + 9, timings, node="node-0")
        delivery = store.plan_delivery(study, destination, "INFERGATE", results, at + 9)
        store.claim_delivery(delivery, at + 9, "node-0")
        items = [
            DeliveryItem(r.sop_instance_uid, r.kind, r.path, "normal", ResultState.DELIVERED, 0)
            for r in results
        ]
        store.record_attempt(
            delivery, items, state=DeliveryState.DELIVERED, outcome="delivered", reason=None,
            next_attempt_at=at + 10, now=at + 10, node="node-0",
        )  # fmt: skip
        at += 25.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--instances", type=int, default=300)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-state-size-"))
    postgres = start_postgres()
    try:
        url = postgres.new_database()
        with psycopg.connect(url, autocommit=True) as db:
            Store(url).close()
            empty = _pg_size(db)
            store = Store(url)
            _fill(store, args.studies, args.instances, root / "spool")
            store.close()
            db.execute("VACUUM")
            pg = _pg_size(db) - empty
        sqlite_path = root / "state.db"
        Store(sqlite_path).close()
        with sqlite3.connect(sqlite_path) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        empty = sqlite_path.stat().st_size
        store = Store(sqlite_path)
        _fill(store, args.studies, args.instances, root / "spool")
        store.close()
        with sqlite3.connect(sqlite_path) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        lite = sqlite_path.stat().st_size - empty
    finally:
        postgres.stop()
        shutil.rmtree(postgres.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    count = args.studies * args.instances
    print("| state | bytes per instance | bytes per study |")
    print("|---|---|---|")
    for name, size in (("PostgreSQL", pg), ("SQLite", lite)):
        print(f"| {name} | {size / count:.0f} | {size / args.studies:.0f} |")
    print(f"({args.studies} studies of {args.instances} instances, one job each)")


def _pg_size(db: psycopg.Connection[tuple[int]]) -> int:
    row = db.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


if __name__ == "__main__":
    main()
