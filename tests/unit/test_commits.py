"""Group commit: instances that arrive together become durable together."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from infergate.errors import InfergateError, StoreError
from infergate.ingest.commits import InstanceCommitter
from infergate.ingest.spool import Spool
from infergate.store import Arrival, ArrivalOutcome, InstanceRecord, Store


class CountingStore(Store):
    """The real store, counting its transactions for instances and holding the first
    one until told, so that the others queue up behind it."""

    def __init__(self, where: Path | str) -> None:
        super().__init__(where)
        self.groups: list[int] = []
        self.release_first = threading.Event()

    def record_instances(
        self,
        records: list[InstanceRecord],
        *,
        replace_changed: bool = False,
        now: float | None = None,
    ) -> list[ArrivalOutcome]:
        if not self.groups:
            self.release_first.wait(10)
        self.groups.append(len(records))
        return super().record_instances(records, replace_changed=replace_changed, now=now)


def _partial(spool: Spool, uid: str, content: bytes) -> tuple[Path, InstanceRecord]:
    path = spool.tmp_dir / f"{uid}.part"
    path.write_bytes(content)
    record = InstanceRecord(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_uid="1.2.3",
        study_uid="1.2",
        modality="CT",
        path=path,
        size=len(content),
        association_id="a",
        calling_ae="SCANNER",
        called_ae="INFERGATE",
        sha256=content.hex(),
    )
    return path, record


def _commit_all(
    committer: InstanceCommitter, items: list[tuple[Path, InstanceRecord]]
) -> list[tuple[InstanceRecord, ArrivalOutcome] | Exception]:
    results: list[tuple[InstanceRecord, ArrivalOutcome] | Exception] = [
        InfergateError("not run")
    ] * len(items)

    def run(index: int) -> None:
        try:
            results[index] = committer.commit(*items[index])
        except InfergateError as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for thread in threads:
        thread.start()
    return results if _joined(threads) else []


def _joined(threads: list[threading.Thread]) -> bool:
    for thread in threads:
        thread.join(20)
    return not any(t.is_alive() for t in threads)


def test_instances_waiting_together_are_committed_in_one_transaction(
    database: Path | str, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    store = CountingStore(database)
    committer = InstanceCommitter(spool, store, replace_changed=False)
    items = [_partial(spool, f"1.1.{i}", bytes([i]) * 100) for i in range(8)]
    # A second copy of one instance in the same group: it is a duplicate.
    copy = spool.tmp_dir / "copy.part"
    copy.write_bytes(bytes([0]) * 100)
    items.append((copy, dataclasses.replace(items[0][1], path=copy)))

    first = threading.Thread(target=committer.commit, args=_partial(spool, "1.0", b"first"))
    first.start()
    while not committer._committing:
        time.sleep(0.01)
    threading.Timer(0.5, store.release_first.set).start()
    results = _commit_all(committer, items)
    first.join(10)

    assert store.groups[0] == 1
    assert sum(store.groups) == 10
    assert len(store.groups) <= 3  # the eight that queued behind the first went together
    arrivals = [r[1].arrival for r in results if not isinstance(r, Exception)]
    assert arrivals.count(Arrival.NEW) == 8
    assert arrivals.count(Arrival.DUPLICATE) == 1
    stored = sorted(p.read_bytes()[0] for p in spool.instances_dir.iterdir())
    assert len(stored) == 10  # the duplicate's file too: the caller discards it
    assert list(spool.tmp_dir.iterdir()) == []
    for result in results:
        assert not isinstance(result, Exception)
        record, _ = result
        assert record.path.parent == spool.instances_dir
        assert record.path.exists()
    store.close()


def test_a_failed_commit_fails_every_instance_of_its_group_and_keeps_nothing(
    database: Path | str,
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool")
    store = Store(database)
    committer = InstanceCommitter(spool, store, replace_changed=False)
    store.close()  # every transaction now fails
    results = _commit_all(committer, [_partial(spool, f"1.1.{i}", b"x") for i in range(4)])
    assert len(results) == 4
    assert all(isinstance(r, StoreError) for r in results)
    assert list(spool.instances_dir.iterdir()) == []
    assert list(spool.tmp_dir.iterdir()) == []


def test_a_file_outside_tmp_is_refused(database: Path | str, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    store = Store(database)
    committer = InstanceCommitter(spool, store, replace_changed=False)
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(b"x")
    _, record = _partial(spool, "1.1", b"x")
    with pytest.raises(InfergateError, match="not in"):
        committer.commit(outside, record)
    assert outside.exists()
    store.close()
