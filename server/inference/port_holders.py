"""Processes an earlier run may have left: who holds a TCP port on this host, and who
runs a given executable. The embedded Triton's ports are checked before it starts, so
that a ``tritonserver`` orphaned by an earlier run is found and stopped, and a port held
by anything else is named instead of being fought over; Python-backend stubs outlive a
tritonserver killed with SIGKILL (they are re-parented, not signalled) and are found
by their executable, which lies in our own var folder."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


@dataclass(frozen=True)
class PortHolder:
    pid: int
    name: str  # the process's command name (comm)
    command_line: tuple[str, ...]


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == _LISTEN:
                inodes.add(fields[9])
    return inodes


def port_holders(port: int) -> list[PortHolder]:
    """The processes with a socket listening on ``port`` (any address)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return []
    wanted = {f"socket:[{inode}]" for inode in inodes}
    holders = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in wanted for fd in (proc / "fd").iterdir()):
                name = (proc / "comm").read_text().strip()
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                holders.append(
                    PortHolder(
                        int(proc.name), name, tuple(a.decode(errors="replace") for a in argv if a)
                    )
                )
    return holders


def processes_running(executable: Path) -> list[int]:
    """The pids of live processes whose first argument is ``executable``."""
    wanted = str(executable).encode()
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if (proc / "cmdline").read_bytes().split(b"\0", 1)[0] == wanted:
                pids.append(int(proc.name))
    return pids
