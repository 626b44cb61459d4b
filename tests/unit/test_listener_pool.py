"""Listener processes on one port: shared limits, restarts, and no orphans."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from infergate.config import IngestSettings, Settings, StorageSettings
from infergate.errors import ListenerError
from infergate.ingest import listener_pool
from infergate.ingest.listener_pool import ListenerPool
from infergate.store import Store
from infergate.testing import ChestPhantom
from peers import free_port, storescu, wait_until

PoolFactory = Callable[..., tuple[ListenerPool, Settings]]


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator[PoolFactory]:
    pools: list[ListenerPool] = []

    def make(**ingest: Any) -> tuple[ListenerPool, Settings]:
        settings = Settings(
            ingest=IngestSettings(host="127.0.0.1", port=free_port(), min_free_bytes=0, **ingest),
            storage=StorageSettings(var_dir=tmp_path / "var"),
        )
        pool = ListenerPool(settings, Store(settings.storage.database))
        pool.start()
        pools.append(pool)
        return pool, settings

    yield make
    for pool in pools:
        pool.stop()
        pool.store.close()


def _associate(port: int) -> Any:
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title="INFERGATE")


def test_limits_count_the_associations_of_every_process(make_pool: PoolFactory) -> None:
    pool, settings = make_pool(processes=2, max_associations_per_address=3)
    assert len(pool.pids) == 2
    held = [_associate(settings.ingest.port) for _ in range(3)]
    assert all(a.is_established for a in held)
    refused = _associate(settings.ingest.port)
    assert refused.is_rejected
    assert (refused.acceptor.primitive.result, refused.acceptor.primitive.diagnostic) == (2, 2)
    audit = pool.store.associations()
    assert {a.process_id for a in audit} <= set(pool.pids)
    assert [a.outcome for a in audit].count("rejected") == 1
    for assoc in held:
        assoc.release()
    # Once released, the slots are free again, whichever process takes the next one.
    again = _associate(settings.ingest.port)
    assert again.is_established
    again.release()


def test_a_listener_that_dies_is_restarted_and_its_associations_ended(
    make_pool: PoolFactory, small_phantom: ChestPhantom, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener_pool, "RESTART_INTERVAL_S", 0.0)
    pool, settings = make_pool(processes=2)
    held = _associate(settings.ingest.port)
    assert held.is_established
    (audit,) = pool.store.associations()
    os.kill(audit.process_id, signal.SIGKILL)

    def restarted() -> bool:
        pool.watch()  # as serve does, every second
        return audit.process_id not in pool.pids

    wait_until(restarted, 15, "the listener to be restarted")
    assert len(_live(pool)) == 2
    (ended,) = pool.store.associations()
    assert (ended.outcome, ended.reason) == ("aborted", "listener process died")
    held.abort()
    # Both processes serve again: enough associations that each gets some.
    for _ in range(4):
        storescu(settings.ingest.port, list(small_phantom.paths[:2]))
    assert pool.store.receiving_series()[0].instance_count == 2


def _alive(pid: int) -> bool:
    """Running: neither gone nor a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _live(pool: ListenerPool) -> list[int]:
    return [pid for pid in pool.pids if _alive(pid)]


def test_a_busy_port_stops_start_with_the_port_in_the_message(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    _, settings = make_pool(processes=1)
    second = ListenerPool(settings, Store(tmp_path / "other.db"))
    with pytest.raises(ListenerError, match=rf"127\.0\.0\.1:{settings.ingest.port}"):
        second.start()


PARENT = textwrap.dedent(
    """
    import sys, time
    from infergate.config import IngestSettings, Settings, StorageSettings
    from infergate.ingest.listener_pool import ListenerPool
    from infergate.store import Store
    settings = Settings.model_validate_json(sys.stdin.read())
    pool = ListenerPool(settings, Store(settings.storage.database))
    pool.start()
    print("pids", *pool.pids, flush=True)
    time.sleep(600)
    """
)


def test_listeners_exit_when_their_parent_is_killed(tmp_path: Path) -> None:
    settings = Settings(
        ingest=IngestSettings(host="127.0.0.1", port=free_port(), processes=2),
        storage=StorageSettings(var_dir=tmp_path / "var"),
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdin is not None
    assert parent.stdout is not None
    parent.stdin.write(settings.model_dump_json())
    parent.stdin.close()
    line = parent.stdout.readline()
    while not line.startswith("pids "):  # log lines share the parent's stdout
        line = parent.stdout.readline()
    pids = [int(pid) for pid in line.split()[1:]]
    assert len(pids) == 2
    parent.kill()
    parent.wait()

    wait_until(lambda: not any(_alive(pid) for pid in pids), 15, "orphaned listeners to exit")
    with socket.socket() as sock:  # the port is free for the next start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", settings.ingest.port))
