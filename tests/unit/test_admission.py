from __future__ import annotations

from infergate.config import IngestSettings, Peer
from infergate.ingest.admission import AssociationRequest, ListenerLoad, decide

IDLE = ListenerLoad(associations=0, associations_from_address=0, free_bytes=10**12)
SETTINGS = IngestSettings(
    peers=(Peer(ae_title="CT_SCANNER_2", addresses=("10.1.2.3", "10.1.3.0/24")),),
    max_associations=4,
    max_associations_per_address=2,
    min_free_bytes=10**9,
)


def _rsd(
    calling: str,
    address: str,
    called: str = "INFERGATE",
    load: ListenerLoad = IDLE,
    settings: IngestSettings = SETTINGS,
) -> tuple[int, ...] | None:
    rejection = decide(AssociationRequest(calling, called, address), settings, load)
    return None if rejection is None else (rejection.result, rejection.source, rejection.diagnostic)


def test_configured_peer_is_admitted_from_its_addresses() -> None:
    assert _rsd("CT_SCANNER_2", "10.1.2.3") is None
    assert _rsd("CT_SCANNER_2", "10.1.3.77") is None


def test_unknown_calling_ae_is_calling_ae_not_recognised() -> None:
    assert _rsd("STRANGER", "10.1.2.3") == (1, 1, 3)


def test_known_ae_from_a_wrong_address_is_calling_ae_not_recognised() -> None:
    assert _rsd("CT_SCANNER_2", "10.9.9.9") == (1, 1, 3)
    rejection = decide(AssociationRequest("CT_SCANNER_2", "INFERGATE", "10.9.9.9"), SETTINGS, IDLE)
    assert rejection is not None
    assert "from this address" in rejection.reason


def test_wrong_called_ae_is_called_ae_not_recognised() -> None:
    assert _rsd("CT_SCANNER_2", "10.1.2.3", called="PACS") == (1, 1, 7)


def test_defaults_admit_loopback_only() -> None:
    defaults = IngestSettings()
    assert _rsd("ANYONE", "127.0.0.1", settings=defaults) is None
    assert _rsd("ANYONE", "::1", settings=defaults) is None
    assert _rsd("ANYONE", "192.168.1.20", settings=defaults) == (1, 1, 3)


def test_accept_any_peer_is_an_explicit_switch() -> None:
    lab = SETTINGS.model_copy(update={"accept_any_peer": True})
    assert _rsd("STRANGER", "192.0.2.1", settings=lab) is None
    assert _rsd("STRANGER", "192.0.2.1", called="OTHER", settings=lab) == (1, 1, 7)


def test_load_limits_are_transient() -> None:
    full_disk = ListenerLoad(0, 0, free_bytes=10**6)
    assert _rsd("CT_SCANNER_2", "10.1.2.3", load=full_disk) == (2, 3, 1)
    busy = ListenerLoad(associations=4, associations_from_address=0, free_bytes=10**12)
    assert _rsd("CT_SCANNER_2", "10.1.2.3", load=busy) == (2, 3, 2)
    greedy = ListenerLoad(associations=2, associations_from_address=2, free_bytes=10**12)
    assert _rsd("CT_SCANNER_2", "10.1.2.3", load=greedy) == (2, 3, 2)
