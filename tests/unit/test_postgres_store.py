"""What is PostgreSQL's own in the state store: the rewritten queries, the schema version,
messages that name the server and no credential, and several stores (several nodes'
processes) on one database whose write transactions do not interleave."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from postgres import PostgresServer

from infergate.config import Settings
from infergate.errors import StoreError
from infergate.store import Arrival, AssociationAudit, InstanceRecord, NewJob, Store
from infergate.store.postgres import describe, to_psycopg
from infergate.work.states import JobKind

pytestmark = pytest.mark.usefixtures("closing_pools")


def _record(uid: str, series: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_uid=series,
        study_uid="1.2",
        modality="CT",
        path=Path(f"/spool/{uid}.dcm"),
        size=3_000_000_000,  # more than PostgreSQL's INTEGER holds
        association_id="a1",
        calling_ae="SCANNER",
        called_ae="INFERGATE",
        sha256="aa",
    )


def test_queries_are_rewritten_to_psycopgs_marks_outside_literals() -> None:
    assert to_psycopg("SELECT ? WHERE a = :study AND b::text LIKE '50%?' AND c % 2 = ?") == (
        "SELECT %s WHERE a = %(study)s AND b::text LIKE '50%%?' AND c %% 2 = %s"
    )
    assert to_psycopg("SELECT 'it''s :not ? a mark'") == "SELECT 'it''s :not ? a mark'"


def test_the_url_is_told_without_its_credentials() -> None:
    told = describe("postgresql://gateway:s3cret@db.example:5433/infergate")
    assert told == "postgresql://db.example:5433/infergate"
    assert "s3cret" not in describe("postgresql://gateway:s3cret@/infergate")


def test_an_unreachable_server_is_a_store_error_naming_it_without_the_password(
    postgres: PostgresServer,
) -> None:
    url = f"postgresql://infergate:s3cret@127.0.0.1:{postgres.port + 1}/nothing"
    with pytest.raises(StoreError) as raised:
        Store(url)
    assert f"postgresql://127.0.0.1:{postgres.port + 1}/nothing" in str(raised.value)
    assert "s3cret" not in str(raised.value)


def test_settings_take_a_postgresql_url_and_refuse_another_scheme(tmp_path: Path) -> None:
    url = "postgresql://gateway@db:5432/infergate"
    assert Settings.model_validate({"storage": {"database_url": url}}).storage.database == url
    sqlite = Settings.model_validate({"storage": {"database_url": f"sqlite:///{tmp_path}/s.db"}})
    assert sqlite.storage.database == tmp_path / "s.db"
    with pytest.raises(ValueError, match="sqlite:///FILE or postgresql://"):
        Settings.model_validate({"storage": {"database_url": "mysql://db/infergate"}})


def test_big_sizes_and_exact_times_round_trip(postgres: PostgresServer) -> None:
    store = Store(postgres.new_database())
    at = 1_764_633_600.123456
    assert store.record_instance(_record("1.1"), now=at).arrival is Arrival.NEW
    (series,) = store.receiving_series()
    assert series.last_received_at == at  # a double, not PostgreSQL's 4-byte REAL
    assert store.series_bytes("1.2.3") == 3_000_000_000
    # The exact time is what completion compares with: it must match what was read.
    assert store.complete_series(series, [NewJob("j", JobKind.INFERENCE, "ct_lung")], at + 9)
    store.close()


def test_a_database_of_a_newer_infergate_is_refused(postgres: PostgresServer) -> None:
    url = postgres.new_database()
    Store(url).close()
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("UPDATE infergate_schema SET version = version + 1")
    with pytest.raises(StoreError, match="written by a newer Infergate"):
        Store(url)


def test_two_nodes_stores_on_one_database_neither_lose_nor_double_anything(
    postgres: PostgresServer,
) -> None:
    """Two stores (two nodes) record the halves of a series at once and both try to
    complete it: every instance is counted once, and one of them creates its jobs."""
    url = postgres.new_database()
    nodes = [Store(url), Store(url)]
    errors: list[BaseException] = []

    def receive(store: Store, uids: list[str]) -> None:
        try:
            for uid in uids:
                store.record_instance(_record(uid), now=10.0)
        except BaseException as exc:
            errors.append(exc)

    halves = [[f"1.{n}" for n in range(k, 60, 2)] for k in (0, 1)]
    threads = [
        threading.Thread(target=receive, args=pair) for pair in zip(nodes, halves, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    (series,) = nodes[0].receiving_series()
    assert series.instance_count == 60
    done: list[bool] = []

    def complete(store: Store, name: str) -> None:
        done.append(
            store.complete_series(series, [NewJob(name, JobKind.INFERENCE, "ct_lung")], 20.0)
        )

    racers = [threading.Thread(target=complete, args=(s, f"job-{i}")) for i, s in enumerate(nodes)]
    for thread in racers:
        thread.start()
    for thread in racers:
        thread.join()
    assert sorted(done) == [False, True]
    assert len(nodes[1].jobs()) == 1
    for store in nodes:
        store.close()


@dataclass(frozen=True)
class _Full:
    reason: str = "no slot left"


def test_the_last_association_slot_goes_to_one_node_only(postgres: PostgresServer) -> None:
    """Admission counts the open associations and records its verdict in one write
    transaction; nodes racing for the last slot must not both see it free."""
    url = postgres.new_database()
    nodes = [Store(url) for _ in range(4)]
    start = threading.Barrier(len(nodes) * 4)
    admitted: list[bool] = []

    def associate(store: Store, n: int) -> None:
        audit = AssociationAudit(
            f"assoc-{id(store)}-{n}", "10.0.0.7", 4000 + n, "SCANNER", "INFERGATE", False,
            "accepted", None, 1.0,
        )  # fmt: skip
        start.wait()
        verdict = store.admit(audit, lambda total, _: _Full() if total >= 1 else None, 1.0)
        admitted.append(verdict is None)

    threads = [
        threading.Thread(target=associate, args=(store, n)) for store in nodes for n in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert admitted.count(True) == 1
    for store in nodes:
        store.close()


def test_a_version_10_database_is_brought_to_this_version(postgres: PostgresServer) -> None:
    """Version 10 is where PostgreSQL started; the step to 11 runs on it as on SQLite."""
    url = postgres.new_database()
    Store(url).close()
    with psycopg.connect(url, autocommit=True) as db:
        for table in ("deliveries", "notifications", "associations"):
            db.execute(f"ALTER TABLE {table} DROP COLUMN node")
        db.execute("DROP TABLE nodes")
        db.execute("UPDATE infergate_schema SET version = 10")
    store = Store(url)
    store.beat("ig-node-1", 30.0, started_at=30.0, version="test")
    assert [n.node for n in store.nodes()] == ["ig-node-1"]
    with psycopg.connect(url, autocommit=True) as db:
        (version,) = db.execute("SELECT version FROM infergate_schema").fetchone() or (0,)
    assert version == 11
    store.close()
