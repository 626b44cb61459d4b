"""The in-process listener that the listener's unit tests talk to over loopback."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from infergate.ingest.scp import StorageSCP
from infergate.ingest.spool import Spool
from infergate.store import Store


@dataclass
class Listener:
    scp: StorageSCP
    store: Store
    spool: Spool
    port: int


ListenerFactory = Callable[..., Listener]
