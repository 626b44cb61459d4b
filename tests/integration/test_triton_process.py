"""The embedded tritonserver as a process: loopback only, and what an earlier run left
on its ports stopped or named (real tritonserver processes)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from infergate.errors import TritonUnavailableError
from infergate.inference.embedded import EmbeddedTriton
from peers import REPO, process_name, triton_settings, wait_until

pytestmark = pytest.mark.integration


def _one_model(tmp_path: Path) -> Path:
    """A repository with the smallest reference model only, to start fast."""
    repository = tmp_path / "models"
    repository.mkdir()
    (repository / "ct_head_bleed").symlink_to(REPO / "model_repository" / "ct_head_bleed")
    return repository


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on ``port``, from /proc/net/tcp and
    tcp6 (an IPv4-mapped IPv6 address as the IPv4 one)."""
    addresses = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            hex_address, hex_port = local.split(":")
            if int(hex_port, 16) != port or state != "0A":
                continue
            raw = bytes.fromhex(hex_address)
            # The kernel prints each 32-bit word in host (little endian) order.
            ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(ordered)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            addresses.add(str(address))
    return addresses


def test_a_stale_tritonserver_of_ours_is_stopped_and_the_new_one_is_loopback_only(
    tmp_path: Path,
) -> None:
    settings = triton_settings(_one_model(tmp_path), startup_timeout_s=60)
    stale = EmbeddedTriton(settings, tmp_path / "triton")
    stale.start()  # an earlier run's, never stopped: as after a kill -9 of its gateway
    assert stale._process is not None
    stale_pid = stale._process.pid
    fresh = EmbeddedTriton(settings, tmp_path / "triton")
    try:
        with capture_logs() as logs:
            fresh.start()
        stopped = [e for e in logs if e["event"] == "triton.embedded.stale_stopped"]
        assert stale_pid in {e["pid"] for e in stopped}
        wait_until(lambda: process_name(stale_pid) is None, 10, "the stale tritonserver to end")
        # Triton's endpoints have no authentication: loopback only.
        for port in (settings.grpc_port, settings.http_port, settings.metrics_port):
            assert _listening_addresses(port) == {"127.0.0.1"}, port
    finally:
        fresh.stop()
        stale.stop()


def test_a_port_held_by_another_program_is_named_and_not_fought_over(tmp_path: Path) -> None:
    settings = triton_settings(_one_model(tmp_path), startup_timeout_s=60)
    holder = socket.socket()
    holder.bind(("127.0.0.1", settings.http_port))
    holder.listen()
    try:
        with pytest.raises(TritonUnavailableError, match=r"port \d+ \(triton.http_port\) is held"):
            EmbeddedTriton(settings, tmp_path / "triton").start()
    finally:
        holder.close()
