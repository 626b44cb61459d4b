"""A PostgreSQL server the tests start themselves: Debian's ``postgresql`` binaries,
``initdb`` and ``pg_ctl`` in a temporary folder, listening on a loopback port.

PostgreSQL refuses to run as root; when the tests do (CI's container), the server runs
as the ``postgres`` user the Debian package creates, in a folder that user owns.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from peers import free_port

_SUPERUSER = "infergate"


def postgres_bin(name: str) -> str:
    """A PostgreSQL program: Debian keeps them out of PATH, under its major version."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=_major)
    if found:
        return str(found[-1])
    on_path = shutil.which(name)
    assert on_path, f"PostgreSQL's {name} is missing: apt-get install postgresql"
    return on_path


def _major(path: Path) -> int:
    version = path.parent.parent.name
    return int(version) if version.isdigit() else 0


def _as_owner() -> dict[str, Any]:
    return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}


@dataclass
class PostgresServer:
    root: Path
    port: int = field(default_factory=free_port)
    # More server settings, e.g. ("shared_preload_libraries=pg_stat_statements",).
    settings: tuple[str, ...] = ()
    _names: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(
            [postgres_bin("initdb"), "-D", str(self.data), "-U", _SUPERUSER, "--auth=trust",
             "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True, capture_output=True, **_as_owner(),
        )  # fmt: skip
        self.start_again()

    def start_again(self) -> None:
        """Start the server on its data folder (after ``stop``), on the same port."""
        # fsync off: the tests kill gateways and this server's processes, never the
        # machine (what a killed server wrote is in the kernel's cache), and it saves seconds.
        options = " ".join(
            [f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"]
            + [f"-c {setting}" for setting in self.settings]
        )
        subprocess.run(
            [postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
             "-o", options, "-w", "start"],
            check=True, capture_output=True, **_as_owner(),
        )  # fmt: skip

    def stop(self) -> None:
        subprocess.run(
            [postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
            check=False, capture_output=True, **_as_owner(),
        )  # fmt: skip

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a database created now, empty."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        path = self.root / "log"
        return path.read_text() if path.exists() else ""


def start_postgres(*settings: str) -> PostgresServer:
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="infergate-pg-")), settings=settings)
    server.start()
    return server
