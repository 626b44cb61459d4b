"""DICOM TLS: the client-certificate matrix, against pynetdicom and DCMTK's storescu.

Certificates come from two test CAs made by trustme: the hospital's, which the
listener trusts for clients, and a stranger's, which it does not.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
import trustme
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from infergate.cli import check_tls_files
from infergate.config import (
    Destination,
    IngestSettings,
    Peer,
    Settings,
    StorageSettings,
    TlsSettings,
)
from infergate.dicom.tls import server_context
from infergate.errors import ConfigError
from infergate.export.outcomes import OutcomeClass
from infergate.export.scu import send_objects
from infergate.ingest.listener_pool import ListenerPool
from infergate.ingest.scp import StorageSCP
from infergate.ingest.spool import Spool
from infergate.store import Store
from infergate.testing import ChestPhantom
from peers import (
    PEER_ENV,
    assert_still_connected,
    free_port,
    require_program,
    storescu,
    wait_until,
)


@dataclass
class Pki:
    folder: Path
    ca: trustme.CA
    stranger: trustme.CA

    def write(self, cert: trustme.LeafCert, name: str) -> tuple[Path, Path]:
        """(certificate, private key) files of ``cert``."""
        cert_path, key_path = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(cert_path)
        cert.private_key_pem.write_to_path(key_path)
        return cert_path, key_path

    @property
    def ca_file(self) -> Path:
        path = self.folder / "ca.pem"
        self.ca.cert_pem.write_to_path(path)
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"), trustme.CA(), trustme.CA())


@dataclass
class TlsListener:
    scp: StorageSCP
    store: Store
    port: int
    tls_port: int


@pytest.fixture
def make_tls_listener(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., TlsListener]]:
    started: list[TlsListener] = []

    def make(**overrides: Any) -> TlsListener:
        cert, key = pki.write(pki.ca.issue_cert("127.0.0.1", common_name="infergate"), "server")
        tls = {
            "port": free_port(),
            "certificate": cert,
            "private_key": key,
            "client_ca": pki.ca_file,
            **overrides.pop("tls", {}),
        }
        settings = IngestSettings(
            host="127.0.0.1",
            port=free_port(),
            network_timeout_s=10,
            min_free_bytes=0,
            tls=TlsSettings(**tls),
            **overrides,
        )
        store = Store(tmp_path / f"state-{settings.port}.db")
        scp = StorageSCP(settings, Spool(tmp_path / f"spool-{settings.port}"), store)
        scp.start()
        assert settings.tls is not None
        started.append(TlsListener(scp, store, settings.port, settings.tls.port))
        return started[-1]

    yield make
    for listener in started:
        listener.scp.stop()
        listener.store.close()


def client_context(pki: Pki, cert: trustme.LeafCert | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_file))
    if cert is not None:
        cert_path, key_path = pki.write(cert, "client")
        context.load_cert_chain(cert_path, key_path)
    return context


def associate(port: int, context: ssl.SSLContext | None, calling: str = "SCANNER1") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    tls_args = (context, "127.0.0.1") if context is not None else None
    return ae.associate("127.0.0.1", port, ae_title="INFERGATE", tls_args=tls_args)


def test_trusted_client_certificate_is_accepted_and_audited(
    make_tls_listener: Callable[..., TlsListener], pki: Pki, small_phantom: ChestPhantom
) -> None:
    listener = make_tls_listener()
    context = client_context(pki, pki.ca.issue_cert("scanner1.test", common_name="SCANNER1"))
    with structlog.testing.capture_logs() as logs:
        assoc = associate(listener.tls_port, context)
        assert assoc.is_established
        status = assoc.send_c_store(pydicom.dcmread(small_phantom.paths[0]))
        assoc.release()
    assert status.Status == 0x0000
    assert listener.store.receiving_series()[0].instance_count == 1
    accepted = next(e for e in logs if e["event"] == "ingest.association.accepted")
    assert (accepted["tls"], accepted["tls_subject"]) == (True, "SCANNER1")
    (audit,) = listener.store.associations()
    assert (audit.tls, audit.outcome, audit.instances) == (True, "released", 1)


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("no certificate", "sent no certificate"),
        ("a stranger's certificate", "not trusted"),
        ("plain TCP", "does not speak TLS"),
    ],
)
def test_clients_without_a_trusted_certificate_are_refused(
    make_tls_listener: Callable[..., TlsListener],
    pki: Pki,
    small_phantom: ChestPhantom,
    client: str,
    reason: str,
) -> None:
    listener = make_tls_listener()
    context = None  # plain TCP
    if client == "no certificate":
        context = client_context(pki, None)
    elif client == "a stranger's certificate":
        intruder = pki.stranger.issue_cert("intruder.test", common_name="SCANNER1")
        context = client_context(pki, intruder)
    with structlog.testing.capture_logs() as logs:
        assoc = associate(listener.tls_port, context)
        # Whatever the client saw of the handshake, nothing gets through.
        established = assoc.is_established and "Status" in assoc.send_c_store(
            pydicom.dcmread(small_phantom.paths[0])
        )
        if assoc.is_established:
            assoc.abort()
        # The listener's handshake thread logs and audits the refusal on its own time
        # (the client may have seen the alert first).
        refused = wait_until(
            lambda: next((e for e in logs if e["event"] == "ingest.tls.refused"), None),
            10,
            "ingest.tls.refused",
        )
    assert not established
    assert reason in refused["reason"]
    wait_until(listener.store.associations, 10, "the refusal's audit row")
    (audit,) = listener.store.associations()
    assert (audit.tls, audit.outcome) == (True, "rejected")
    assert reason in (audit.reason or "")
    assert listener.store.receiving_series() == []
    # Other peers are unaffected: plain TCP on the plain port still works.
    storescu(listener.port, list(small_phantom.paths[:2]))
    assert listener.store.receiving_series()[0].instance_count == 2


def test_a_silent_tls_client_does_not_hold_up_others(
    make_tls_listener: Callable[..., TlsListener], pki: Pki, small_phantom: ChestPhantom
) -> None:
    listener = make_tls_listener(tls={"handshake_timeout_s": 60})
    silent = socket.create_connection(("127.0.0.1", listener.tls_port))
    half = socket.create_connection(("127.0.0.1", listener.tls_port))
    half.sendall(b"\x16\x03\x01\x00\xff")  # a TLS record header, then nothing
    context = client_context(pki, pki.ca.issue_cert("scanner1.test", common_name="SCANNER1"))
    for _ in range(3):
        assoc = associate(listener.tls_port, context)
        assert assoc.is_established
        assoc.send_c_store(pydicom.dcmread(small_phantom.paths[0]))
        assoc.release()
    # Both are still connected: the others did not wait for their handshakes to time out.
    assert_still_connected(silent, half)


def test_a_client_that_connects_and_leaves_is_not_an_attack(
    make_tls_listener: Callable[..., TlsListener],
) -> None:
    listener = make_tls_listener()
    with structlog.testing.capture_logs() as logs:
        socket.create_connection(("127.0.0.1", listener.tls_port)).close()  # a health check
        deadline = time.monotonic() + 10
        while not any(e["event"] == "ingest.tls.closed" for e in logs):
            assert time.monotonic() < deadline, "the closed connection was not noticed"
            time.sleep(0.05)
    assert not any(e["event"] == "ingest.tls.refused" for e in logs)
    assert listener.store.associations() == []


def test_dcmtk_storescu_over_tls(
    make_tls_listener: Callable[..., TlsListener], pki: Pki, small_phantom: ChestPhantom
) -> None:
    listener = make_tls_listener()
    cert, key = pki.write(pki.ca.issue_cert("scanner2.test", common_name="SCANNER2"), "dcmtk")
    result = subprocess.run(
        [
            require_program("storescu"),
            "+tls", str(key), str(cert),
            "+cf", str(pki.ca_file),
            "-aet", "SCANNER2", "-aec", "INFERGATE",
            "127.0.0.1", str(listener.tls_port),
            *[str(p) for p in small_phantom.paths[:5]],
        ],
        capture_output=True, text=True, env=PEER_ENV, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Count what was stored: storescu can exit 0 when some failed.
    assert listener.store.receiving_series()[0].instance_count == 5
    assert all(a.tls for a in listener.store.associations())


def test_a_peer_that_requires_tls_is_refused_over_plain_tcp(
    make_tls_listener: Callable[..., TlsListener], pki: Pki
) -> None:
    listener = make_tls_listener(
        peers=(Peer(ae_title="SCANNER1", addresses=("127.0.0.1",), require_tls=True),)
    )
    with structlog.testing.capture_logs() as logs:
        plain = associate(listener.port, None)
    assert plain.is_rejected
    primitive = plain.acceptor.primitive
    assert (primitive.result, primitive.result_source, primitive.diagnostic) == (1, 1, 3)
    rejected = next(e for e in logs if e["event"] == "ingest.association.rejected")
    assert "over DICOM TLS only" in rejected["reason"]
    context = client_context(pki, pki.ca.issue_cert("scanner1.test", common_name="SCANNER1"))
    secure = associate(listener.tls_port, context)
    assert secure.is_established
    secure.release()


def test_minimum_tls_version_is_enforced(
    make_tls_listener: Callable[..., TlsListener], pki: Pki
) -> None:
    listener = make_tls_listener(tls={"minimum_version": "1.3"})
    context = client_context(pki, pki.ca.issue_cert("scanner1.test", common_name="SCANNER1"))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with structlog.testing.capture_logs() as logs:
        assoc = associate(listener.tls_port, context)
    assert not assoc.is_established
    refused = next(e for e in logs if e["event"] == "ingest.tls.refused")
    assert "TLS version is not allowed" in refused["reason"]


def test_tls_settings_that_cannot_work_stop_start(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.write(pki.ca.issue_cert("127.0.0.1"), "server")
    with pytest.raises(ValueError, match="needs client_ca"):
        TlsSettings(certificate=cert, private_key=key)
    with pytest.raises(ValueError, match="nothing would listen"):
        IngestSettings(plain=False)
    missing = TlsSettings(certificate=tmp_path / "nope.pem", private_key=key, client_ca=cert)
    with pytest.raises(ConfigError, match=r"cannot use certificate .*nope\.pem"):
        server_context(missing)
    other_key = pki.write(pki.stranger.issue_cert("127.0.0.1"), "other")[1]
    mismatched = TlsSettings(certificate=cert, private_key=other_key, client_ca=cert)
    with pytest.raises(ConfigError, match="cannot use certificate"):
        server_context(mismatched)


def test_listener_processes_serve_tls_and_plain(
    pki: Pki, tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    cert, key = pki.write(pki.ca.issue_cert("127.0.0.1"), "server")
    settings = Settings(
        ingest=IngestSettings(
            host="127.0.0.1",
            port=free_port(),
            processes=2,
            min_free_bytes=0,
            tls=TlsSettings(
                port=free_port(), certificate=cert, private_key=key, client_ca=pki.ca_file
            ),
        ),
        storage=StorageSettings(var_dir=tmp_path / "var"),
    )
    pool = ListenerPool(settings, Store(settings.storage.database))
    pool.start()
    try:
        assert settings.ingest.tls is not None
        context = client_context(pki, pki.ca.issue_cert("scanner1.test", common_name="SCANNER1"))
        for _ in range(3):
            assoc = associate(settings.ingest.tls.port, context)
            assert assoc.is_established
            assoc.send_c_store(pydicom.dcmread(small_phantom.paths[0]))
            assoc.release()
        assert not associate(settings.ingest.tls.port, client_context(pki, None)).is_established
        storescu(settings.ingest.port, list(small_phantom.paths[1:3]))
    finally:
        pool.stop()
    audit = pool.store.associations()
    assert [(a.tls, a.outcome) for a in audit] == [(True, "released")] * 3 + [
        (True, "rejected"),
        (False, "released"),
    ]
    assert pool.store.receiving_series()[0].instance_count == 3


def _tls_pacs(pki: Pki, folder: Path, server: trustme.CA) -> tuple[subprocess.Popen[bytes], int]:
    """DCMTK's storescp over TLS: its certificate from ``server``, client certificates
    required and checked against the hospital CA."""
    cert, key = pki.write(server.issue_cert("127.0.0.1", common_name="PACS"), f"pacs-{id(server)}")
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [
            require_program("storescp"),
            "+tls", str(key), str(cert),
            "+cf", str(pki.ca_file),
            "-aet", "TLSPACS", "-od", str(folder), str(port),
        ],
        env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_until(lambda: _listening(port), 10, "storescp over TLS")
    return process, port


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _send_to_tls_pacs(
    pki: Pki, small_phantom: ChestPhantom, received: Path, server: trustme.CA
) -> Any:
    """Two instances sent to a TLS PACS whose certificate ``server`` signed, with a
    client certificate of the hospital CA; the attempt's outcome."""
    pacs, port = _tls_pacs(pki, received, server)
    cert, key = pki.write(
        pki.ca.issue_cert("infergate.test", common_name="INFERGATE"), "infergate-client"
    )
    tls = {"ca": str(pki.ca_file), "certificate": str(cert), "private_key": str(key)}
    destination = Destination.model_validate(
        {"ae_title": "TLSPACS", "host": "127.0.0.1", "port": port, "tls": tls}
    )
    try:
        return send_objects(
            [(f"uid-{i}", path) for i, path in enumerate(small_phantom.paths[:2])],
            destination,
            "INFERGATE",
            timeout_s=10,
        )
    finally:
        pacs.terminate()
        pacs.wait(timeout=30)


def test_results_go_to_a_tls_only_pacs_with_infergates_client_certificate(
    pki: Pki, small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    attempt = _send_to_tls_pacs(pki, small_phantom, tmp_path / "received", pki.ca)
    assert attempt.failure is None
    assert [o.outcome for o in attempt.objects] == [OutcomeClass.DELIVERED] * 2
    assert len(list((tmp_path / "received").iterdir())) == 2


def test_a_pacs_whose_certificate_no_trusted_ca_signed_is_not_sent_to(
    pki: Pki, small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    attempt = _send_to_tls_pacs(pki, small_phantom, tmp_path / "received", pki.stranger)
    assert attempt.failure is OutcomeClass.TRANSIENT
    assert attempt.reason is not None
    assert "CERTIFICATE_VERIFY_FAILED" in attempt.reason
    assert list((tmp_path / "received").iterdir()) == []


def test_a_destination_tls_file_that_cannot_be_used_stops_check(tmp_path: Path) -> None:
    broken = tmp_path / "not-a-ca.pem"
    broken.write_text("not a certificate")
    settings = Settings.model_validate(
        {
            "export": {
                "destination": {
                    "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
                    "tls": {"ca": str(broken)},
                }
            }
        }
    )  # fmt: skip
    with pytest.raises(ConfigError, match="export destination tls"):
        check_tls_files(settings)
