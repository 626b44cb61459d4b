"""Frozen settings: a YAML file (``--config``) plus ``INFERGATE_*`` environment variables.

Environment variables override the file; nested keys use ``__``, for example
``INFERGATE_INGEST__PORT=11113``. An unknown key anywhere is an error that names
the key and the file.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from infergate import __version__
from infergate.errors import ConfigError
from infergate.routing.rules import Rule


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# A path resolved against the working directory at start, once: every consumer (the
# spool, tritonserver in its own folder) then agrees on the same absolute path.
AbsolutePath = Annotated[Path, AfterValidator(Path.resolve)]

ANY_AE_TITLE = "*"
POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")
MAX_AUTO_PROCESSES = 4


class Peer(_Section):
    """A DICOM node allowed to associate: its calling AE title and where it may come from.

    ``ae_title`` ``"*"`` admits any calling AE title from ``addresses``.
    """

    ae_title: str = Field(min_length=1, max_length=16)
    addresses: tuple[str, ...] = Field(min_length=1)
    # Admitted over DICOM TLS only; over plain TCP it is refused as not recognised.
    require_tls: bool = False
    # Its own Storage SCP port: where results return to it (return_to_sender).
    port: int | None = Field(default=None, ge=1, le=65535)

    @field_validator("addresses")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError as exc:
                raise ValueError(f"{address!r} is not an IP address or network") from exc
        return value

    def matches(self, calling_ae: str, address: str) -> bool:
        """This entry is about ``calling_ae`` at ``address`` (TLS aside)."""
        if self.ae_title not in (ANY_AE_TITLE, calling_ae):
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(a, strict=False) for a in self.addresses)


# Out of the box only this machine may send: deny by default, yet the README's
# storescu example works.
LOOPBACK_PEER = Peer(ae_title=ANY_AE_TITLE, addresses=("127.0.0.0/8", "::1/128"))


class DestinationTls(_Section):
    """DICOM TLS to a destination (PS3.15 B.1): the CAs its certificate must chain to,
    and Infergate's client certificate where the PACS asks for one."""

    ca: AbsolutePath  # PEM bundle of the CAs trusted for the destination's certificate
    certificate: AbsolutePath | None = None  # PEM, Infergate's client certificate
    private_key: AbsolutePath | None = None  # PEM, not encrypted
    minimum_version: Literal["1.2", "1.3"] = "1.2"
    # The name its certificate must carry; the host if not set.
    server_name: str | None = None

    @model_validator(mode="after")
    def _key_with_certificate(self) -> DestinationTls:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self


class Destination(_Section):
    """A node that receives results: a DICOM node (``ae_title``, ``host``, ``port``)
    or a DICOMweb service (``stow_url``: STOW-RS), as operators know it."""

    # A DICOM node's AE title; for a DICOMweb service the name deliveries, commands
    # (``--to``) and pages call it by (its URL's host unless set).
    ae_title: str = Field(default="", max_length=16)
    host: str = ""
    port: int = Field(default=0, ge=0, le=65535)
    tls: DestinationTls | None = None
    # A DICOMweb service's base URL, e.g. https://pacs.example.org/dicom-web: results
    # are POSTed to {stow_url}/studies (STOW-RS, PS3.18 10.5).
    stow_url: str | None = None
    # HTTP authentication of a DICOMweb service: basic (username and password) or a
    # bearer token; and the CAs its https certificate must chain to (PEM bundle; the
    # system's trusted CAs if not set).
    username: str | None = None
    password: SecretStr | None = None
    bearer_token: SecretStr | None = None
    ca: AbsolutePath | None = None
    # What it gets of a SEG: "auto", the SEG, or, when its association does not accept
    # Segmentation Storage, Secondary Capture images with the segments drawn on the
    # source slices; "secondary_capture" those images always; "seg" the SEG only (a
    # SEG it refuses is a dead letter).
    segmentation: Literal["auto", "secondary_capture", "seg"] = "auto"
    # Where its deliveries go instead after a permanent failure, or after
    # alternate_after_transient transient ones in a row (an archive, a second PACS).
    alternate: Destination | None = None
    alternate_after_transient: int = Field(default=3, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _dicomweb_identity(cls, data: Any) -> Any:
        """A DICOMweb service is recorded like a DICOM node: its name, and its URL's
        host and port."""
        if not isinstance(data, dict) or not data.get("stow_url"):
            return data
        url = urlsplit(str(data["stow_url"]))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"stow_url must be an http or https URL, not {data['stow_url']!r}")
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError as exc:
            raise ValueError(f"stow_url has a bad port: {exc}") from exc
        # A dump of these settings (for a child process) carries them, the same.
        if data.get("host", url.hostname) != url.hostname or data.get("port", port) != port:
            raise ValueError("a DICOMweb destination (stow_url) has no host or port of its own")
        return {
            **data,
            "ae_title": data.get("ae_title") or url.hostname[:16],
            "host": url.hostname,
            "port": port,
        }

    @model_validator(mode="after")
    def _dimse_or_dicomweb(self) -> Destination:
        web = ("username", "password", "bearer_token", "ca")
        if self.stow_url is None:
            if not self.ae_title or not self.host or not self.port:
                raise ValueError("a destination needs ae_title, host and port, or a stow_url")
            given = [name for name in web if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for a DICOMweb destination")
            return self
        if self.tls is not None:
            raise ValueError("tls is DICOM TLS; a DICOMweb destination uses https (and ca)")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.username is not None and self.bearer_token is not None:
            raise ValueError("basic authentication or a bearer token, not both")
        return self

    @property
    def dicomweb(self) -> bool:
        return self.stow_url is not None

    @property
    def key(self) -> tuple[str, str, int]:
        """Who it is, as a delivery records it."""
        return (self.ae_title, self.host, self.port)

    @property
    def described(self) -> str:
        """It as logs, answers and pages name it: "AE at host:port", or a DICOMweb
        service's name and URL."""
        if self.stow_url is not None:
            return f"{self.ae_title} at {self.stow_url} (DICOMweb)"
        return f"{self.ae_title} at {self.host}:{self.port}"


class CalledAE(_Section):
    """A further called AE title on the listener, with settings of its own.

    A PACS can route studies to different AE titles of one Infergate, one per use:
    each title decides which plugins run on what it receives and where the results go.
    """

    ae_title: str = Field(min_length=1, max_length=16)
    # The plugins that run on series sent to this title; None: every installed plugin.
    plugins: tuple[str, ...] | None = None
    # Where the results of this title's series go; None: export.destination.
    destination: Destination | None = None
    # Results go back to the node that sent the series (its calling AE title, at the
    # address it came from, on its peer entry's port); None: export.return_to_sender.
    return_to_sender: bool | None = None


class TlsSettings(_Section):
    """DICOM TLS: a second listener on its own port (PS3.15 B.1, TLS 1.2 or newer)."""

    port: int = Field(default=2762, ge=1, le=65535)  # DICOM's registered TLS port
    certificate: AbsolutePath  # PEM; may hold the chain after the certificate
    private_key: AbsolutePath  # PEM, not encrypted
    # Trust anchors for client certificates (PEM bundle).
    client_ca: AbsolutePath | None = None
    require_client_certificate: bool = True
    minimum_version: Literal["1.2", "1.3"] = "1.2"
    # A client that has not finished its handshake by then is cut off.
    handshake_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _trust_for_client_certificates(self) -> TlsSettings:
        if self.require_client_certificate and self.client_ca is None:
            raise ValueError(
                "require_client_certificate needs client_ca, the CA certificates to trust"
            )
        return self


class IngestSettings(_Section):
    """The DICOM listener."""

    ae_title: str = Field(default="INFERGATE", min_length=1, max_length=16)
    host: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens on the network by design
    port: int = Field(default=11112, ge=1, le=65535)
    # 128 KiB PDUs were measured faster than 16 KiB ones on this machine kind.
    max_pdu_length: int = Field(default=131072, ge=4096)
    network_timeout_s: float = Field(default=60.0, gt=0)
    # How long a connection may take to send its A-ASSOCIATE-RQ, and a peer to answer
    # a release: TCP health checks and port scans hold a thread no longer than this.
    acse_timeout_s: float = Field(default=30.0, gt=0)
    # A Deflated dataset that inflates to more than this is refused (0xA700): a bomb.
    max_inflated_bytes: int = Field(default=512 * 1024**2, ge=1024**2)
    # Largest A-ASSOCIATE-RQ accepted; a request with 128 presentation contexts is ~20 KiB.
    max_association_request_bytes: int = Field(default=65536, ge=1024)
    # Who may associate. Everyone else is refused with the matching A-ASSOCIATE-RJ.
    peers: tuple[Peer, ...] = (LOOPBACK_PEER,)
    # For labs only: admit any calling AE title from any address.
    accept_any_peer: bool = False
    # A PACS pushing a study often opens several associations at once.
    max_associations: int = Field(default=32, ge=1)
    max_associations_per_address: int = Field(default=8, ge=1)
    # Connections from one address that have not yet sent an A-ASSOCIATE-RQ (health
    # checks, port scans, a peer dripping its request), per listener process: more are
    # closed at once, so such sockets cannot take every connection slot.
    max_unassociated_per_address: int = Field(default=16, ge=1)
    # Below this much free space in the spool's file system, C-STORE answers 0xA700
    # and new associations get a transient reject, until space returns.
    min_free_bytes: int = Field(default=1024**3, ge=0)
    # An instance re-sent under a known SOP Instance UID with other content: keep the
    # first one received, or replace it (and process its series again).
    changed_instance_policy: Literal["keep_first", "replace"] = "keep_first"
    # Listener processes sharing the port: Python runs one thread at a time per
    # process. "auto" is one per core, at most MAX_AUTO_PROCESSES.
    processes: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = "auto"
    # DICOM TLS on tls.port; plain TCP on port unless plain is false.
    tls: TlsSettings | None = None
    plain: bool = True
    # Called AE titles besides ae_title, each with its own plugins and destination.
    called_aes: tuple[CalledAE, ...] = ()
    # The called AE title `infergate selftest` sends its generated study to: every
    # plugin runs on it and its results stay on disk, never sent to a destination
    # unless the selftest asks (--destination). None: no such title.
    selftest_ae_title: str | None = Field(default="IG_SELFTEST", min_length=1, max_length=16)

    @model_validator(mode="after")
    def _some_listener(self) -> IngestSettings:
        if not self.plain and self.tls is None:
            raise ValueError("plain is false and tls is not set: nothing would listen")
        if self.tls is not None and self.plain and self.tls.port == self.port:
            raise ValueError(f"tls.port and port are both {self.port}")
        titles = [self.ae_title, *(c.ae_title for c in self.called_aes)]
        if self.selftest_ae_title is not None:
            titles.append(self.selftest_ae_title)
        if len(set(titles)) != len(titles):
            raise ValueError(f"called AE titles must differ: {titles}")
        return self

    @property
    def called_ae_titles(self) -> frozenset[str]:
        """Every called AE title the listener answers to."""
        titles = {self.ae_title, *(c.ae_title for c in self.called_aes)}
        if self.selftest_ae_title is not None:
            titles.add(self.selftest_ae_title)
        return frozenset(titles)

    def called_ae(self, title: str) -> CalledAE:
        """The settings of called AE title ``title``; ``ae_title`` (and an unknown one)
        has every plugin and the default destination."""
        for entry in self.called_aes:
            if entry.ae_title == title:
                return entry
        if title == self.selftest_ae_title:
            return CalledAE(ae_title=title, return_to_sender=False)
        return CalledAE(ae_title=self.ae_title)

    @property
    def listener_processes(self) -> int:
        if self.processes == "auto":
            return max(1, min(os.cpu_count() or 1, MAX_AUTO_PROCESSES))
        return self.processes


class StorageSettings(_Section):
    """Where state and spooled instances live.

    ``database_url`` absent is the embedded SQLite file in ``var_dir``; ``sqlite:///F``
    names another file (relative to the working directory, or ``sqlite:////abs``);
    ``postgresql://host:port/db`` is a PostgreSQL database that several nodes may
    share (its password from ``PGPASSWORD`` or a password file, never the URL).
    """

    var_dir: AbsolutePath = Field(default=Path("var"), validate_default=True)
    database_url: str | None = None
    # Connections each process keeps to PostgreSQL at most (a node has a worker and
    # its listener processes): nodes times processes times this stays under max_connections.
    database_pool_size: int = Field(default=4, ge=1, le=64)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str | None) -> str | None:
        if url is None or url.startswith(("sqlite:///", *POSTGRESQL_SCHEMES)):
            return url
        raise ValueError("database_url is sqlite:///FILE or postgresql://HOST:PORT/DATABASE")

    @property
    def spool_dir(self) -> Path:
        return self.var_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.var_dir / "results"

    @property
    def database(self) -> Path | str:
        """The SQLite file (absolute), or the PostgreSQL URL."""
        url = self.database_url
        if url is None:
            return self.var_dir / "infergate.db"
        if url.startswith("sqlite:///"):
            return Path(url.removeprefix("sqlite:///")).resolve()
        return url


class UnmatchedSettings(_Section):
    """What happens to a series that no plugin runs on: it is always logged
    (``routing.series.unmatched``); ``forward`` also sends its instances, as received,
    to ``destination`` (for example a PACS that keeps everything)."""

    action: Literal["ignore", "forward"] = "ignore"
    destination: Destination | None = None

    @model_validator(mode="after")
    def _forward_needs_destination(self) -> UnmatchedSettings:
        if self.action == "forward" and self.destination is None:
            raise ValueError("action forward needs a destination")
        return self


class RoutingSettings(_Section):
    """Which plugins run on which series (``routing.rules``); a plugin that no rule
    names runs on the modalities it declares."""

    rules: tuple[Rule, ...] = ()
    unmatched: UnmatchedSettings = UnmatchedSettings()


class AssemblySettings(_Section):
    """When a series counts as complete."""

    quiet_period_s: float = Field(default=10.0, gt=0)
    poll_interval_s: float = Field(default=0.5, gt=0)
    # A series still receiving this long after its first instance is complete anyway
    # (a sender that never stops); what arrives later starts its next generation.
    max_series_age_s: float | None = Field(default=3600.0, gt=0)
    # "study": the series of a study complete together, once the whole study is quiet.
    scope: Literal["series", "study"] = "series"
    # A series whose sender released its association, with no other association still
    # sending it, is complete after this shorter quiet time. None: the hint is ignored
    # (a modality that opens one association per image would complete series early).
    release_quiet_period_s: float | None = Field(default=None, gt=0)


class VolumeSettings(_Section):
    """How a series becomes the regular volume a plugin gets (``inference.volume``)."""

    # Slices sheared by gantry tilt: shift each in plane onto the first, or refuse.
    tilt: Literal["resample", "refuse"] = "resample"
    # Uneven gaps between slices: interpolate onto the median spacing, or refuse.
    irregular_spacing: Literal["resample", "refuse"] = "resample"
    # A gap over this many times the median spacing means missing slices: refused.
    max_gap_ratio: float = Field(default=2.5, gt=1)


class TritonSettings(_Section):
    """The Triton Inference Server: started by Infergate (embedded) or reached by URL."""

    mode: Literal["embedded", "remote"] = "embedded"
    url: str = "127.0.0.1:8001"
    # remote: several Triton endpoints (gRPC host:port each, e.g. the replicas of a
    # Kubernetes Service listed, or hosts of their own); jobs are spread over the
    # ready ones. Empty: `url` alone.
    urls: tuple[str, ...] = ()
    # How often the gateway asks each endpoint whether it is ready; one that failed a
    # job is skipped until it answers ready again.
    health_interval_s: float = Field(default=5.0, gt=0)
    model_repository: AbsolutePath = Field(default=Path("model_repository"), validate_default=True)

    grpc_port: int = Field(default=8001, ge=1, le=65535)
    http_port: int = Field(default=8000, ge=1, le=65535)
    metrics_port: int = Field(default=8002, ge=1, le=65535)
    request_timeout_s: float = Field(default=300.0, gt=0)
    # Triton unreachable (restarting, overloaded): a job is tried this many times in
    # all, waiting retry_delay_s, doubled each time up to max_retry_delay_s.
    unavailable_attempts: int = Field(default=5, ge=1)
    retry_delay_s: float = Field(default=2.0, ge=0)
    max_retry_delay_s: float = Field(default=60.0, ge=0)
    startup_timeout_s: float = Field(default=120.0, gt=0)
    # Inputs through system shared memory: auto when Triton is on this host (embedded,
    # or a loopback URL); on for a remote URL that shares this host's /dev/shm anyway.
    # A Triton that cannot map the region is used over plain gRPC from then on.
    shared_memory: Literal["auto", "on", "off"] = "auto"
    # Over gRPC, a plugin that declares slice_chunk has this many requests in flight.
    max_requests_in_flight: int = Field(default=8, ge=1, le=64)

    @property
    def grpc_url(self) -> str:
        """The first endpoint (the embedded Triton's, or the first remote one)."""
        return self.endpoints[0]

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every Triton endpoint, gRPC host:port, in the configured order."""
        if self.mode == "embedded":
            return (f"127.0.0.1:{self.grpc_port}",)
        return self.urls or (self.url,)

    @property
    def use_shared_memory(self) -> bool:
        return self.shared_memory_with(self.grpc_url)

    def shared_memory_with(self, endpoint: str) -> bool:
        """Whether inputs go to ``endpoint`` through system shared memory: ``auto``
        when it is on this host (a loopback address)."""
        if self.shared_memory != "auto":
            return self.shared_memory == "on"
        host = endpoint.rsplit(":", 1)[0].strip("[]").lower()
        return host in {"127.0.0.1", "localhost", "::1"}

    @model_validator(mode="after")
    def _distinct_endpoints(self) -> TritonSettings:
        if len(set(self.urls)) != len(self.urls):
            raise ValueError("triton.urls names an endpoint twice")
        return self


class DeviceSettings(_Section):
    """The identity Infergate writes into every result object (General Equipment)."""

    manufacturer: str = "Infergate project"
    manufacturer_model_name: str = "Infergate"
    device_serial_number: str = "INFERGATE-0001"
    software_versions: str = __version__
    institution_name: str | None = None


class ResultsSettings(_Section):
    """Numbering and identity of result objects."""

    device: DeviceSettings = DeviceSettings()
    seg_series_number: int = Field(default=9001, ge=1)
    sr_series_number: int = Field(default=9002, ge=1)
    # Root of the UIDs Infergate creates; results derive theirs deterministically
    # from it and the job, so a re-run never mints new UIDs.
    uid_root: str = Field(default="1.2.826.0.1.3680043.8.498.", pattern=r"^[0-9.]+\.$")


class ExportSettings(_Section):
    """Delivery of results: the outbox (``infergate.export``)."""

    destination: Destination | None = None
    # Results go back to the node that sent the series, where its peer entry in
    # ingest.peers has a port; else to destination.
    return_to_sender: bool = False
    # A transient failure (the destination down, refusing for now, out of resources)
    # is tried again after retry_delay_s, doubled each time up to max_retry_delay_s,
    # until retry_horizon_s after the first attempt; then it is a dead letter.
    retry_delay_s: float = Field(default=5.0, ge=0)
    max_retry_delay_s: float = Field(default=600.0, ge=0)
    retry_horizon_s: float = Field(default=86400.0, gt=0)
    timeout_s: float = Field(default=60.0, gt=0)
    # Associations open at once to one destination.
    max_associations: int = Field(default=2, ge=1, le=32)


class WorkSettings(_Section):
    """How much work runs at once (``infergate.work``)."""

    # Inference jobs in flight; "auto" is two more than the cores (measured: two jobs of
    # one plugin at once finish six studies 18% sooner on 2 cores than one at a time).
    inference_slots: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"
    # Slots only urgent jobs may take, so an urgent series starts at once while normal
    # jobs run (fewer than inference_slots).
    urgent_reserved_slots: int = Field(default=1, ge=0)
    # Jobs of one plugin in flight at once; "auto" is half the slots normal jobs may
    # take (at least one), so one model cannot take every slot.
    per_plugin_slots: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"
    # A job still running this long after it started (volume, plugin steps, Triton,
    # encoding) fails with that reason and frees its slot.
    job_deadline_s: float = Field(default=1800.0, gt=0)
    # A job whose run was cut short by a process death this many times is a dead
    # letter instead of being run again (a job that kills the process).
    max_interruptions: int = Field(default=3, ge=1)
    # Jobs in flight together may need at most this much memory ("auto": 60% of this
    # machine's); a job is judged to need memory_per_input_byte times its instances'
    # bytes. A job over the budget runs alone; one over the machine's memory fails.
    memory_budget_bytes: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    memory_per_input_byte: float = Field(default=12.0, gt=0)
    # Each inference job in a process of its own, forked from a warm forkserver (the
    # GIL serialises jobs on threads; a process past its deadline can be killed).
    # false: jobs run on threads of the gateway (plugins that cannot be pickled).
    job_processes: bool = True
    # On SIGTERM, jobs and associations in flight get this long to finish; what is
    # still running then is put back (jobs queued, deliveries due) for the next start.
    stop_grace_s: float = Field(default=20.0, ge=0)
    # Nodes sharing a PostgreSQL database: a node whose beat (every third of this) is
    # older than this is gone, and another takes over its jobs, deliveries and
    # notifications. Longer than any pause a live node may have (a stalled disk).
    lease_s: float = Field(default=30.0, ge=1)

    @property
    def beat_interval_s(self) -> float:
        return self.lease_s / 3

    @model_validator(mode="after")
    def _room_for_normal_jobs(self) -> WorkSettings:
        if self.inference_slots != "auto" and self.urgent_reserved_slots >= self.inference_slots:
            raise ValueError("urgent_reserved_slots must be fewer than inference_slots")
        return self

    @property
    def slots(self) -> int:
        if self.inference_slots == "auto":
            return max(2, (os.cpu_count() or 1) + 2, self.urgent_reserved_slots + 1)
        return self.inference_slots

    @property
    def normal_slots(self) -> int:
        return self.slots - self.urgent_reserved_slots

    @property
    def plugin_slots(self) -> int:
        if self.per_plugin_slots == "auto":
            return max(1, (self.normal_slots + 1) // 2)
        return self.per_plugin_slots

    @property
    def memory_budget(self) -> int:
        if self.memory_budget_bytes == "auto":
            return int(machine_memory_bytes() * 0.6)
        return self.memory_budget_bytes


def machine_memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class RetentionSettings(_Section):
    """How long finished studies stay (``infergate.ops.retention``)."""

    enabled: bool = True
    # A study is removed this long after it finished: every result delivered (or kept,
    # with no destination), every job ended. Fractions of a day are allowed.
    keep_days: float = Field(default=7.0, ge=0)
    # Over this much of the var folder's file system in use, finished studies go
    # sooner, oldest first, until under low_water_percent.
    high_water_percent: float = Field(default=90.0, gt=0, le=100)
    low_water_percent: float = Field(default=80.0, gt=0, le=100)
    # Rows of the associations audit trail are kept this long.
    audit_keep_days: float = Field(default=90.0, ge=0)
    interval_s: float = Field(default=60.0, gt=0)
    # Files in the spool and results folders that no row names (a crash between a
    # study's rows going and its files) are removed once they are this old, in a sweep
    # at start and every orphan_sweep_interval_s (a file is written before its row).
    orphan_age_s: float = Field(default=3600.0, ge=60)
    orphan_sweep_interval_s: float = Field(default=3600.0, gt=0)

    @model_validator(mode="after")
    def _low_under_high(self) -> RetentionSettings:
        if self.low_water_percent > self.high_water_percent:
            raise ValueError("low_water_percent must not be over high_water_percent")
        return self


class OpsSettings(_Section):
    """The ops HTTP endpoint: probes, metrics, the admin API and the status page
    (``infergate.ops``)."""

    enabled: bool = True
    # Loopback unless told otherwise: what it serves is for the operators' own tools.
    host: str = "127.0.0.1"
    port: int = Field(default=9111, ge=1, le=65535)
    # What the admin API asks of a request that changes state (a retry, a replay), as
    # "Authorization: Bearer <token>"; None: every such request is refused. Best given
    # in the environment: INFERGATE_OPS__TOKEN.
    token: SecretStr | None = Field(default=None)

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value


class NotificationReceiver(_Section):
    """Where a critical finding goes besides the DICOM results: an HL7 v2 system
    (ORU^R01 over MLLP, ``host`` and ``port``), a FHIR R4 server (a DiagnosticReport
    POSTed to ``url``, its base) or a webhook (JSON POSTed to ``url``)."""

    name: str = Field(min_length=1, max_length=64)
    kind: Literal["hl7v2", "fhir", "webhook"]
    host: str = ""
    port: int = Field(default=0, ge=0, le=65535)
    url: str | None = None
    bearer_token: SecretStr | None = None
    ca: AbsolutePath | None = None  # PEM bundle for an https url
    # MSH-3/4 and MSH-5/6 of an HL7 message.
    sending_application: str = "INFERGATE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""

    @model_validator(mode="after")
    def _where(self) -> NotificationReceiver:
        if self.kind == "hl7v2":
            if not self.host or not self.port:
                raise ValueError("an hl7v2 receiver needs host and port (its MLLP listener)")
        elif self.url is None or urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError(f"a {self.kind} receiver needs an http or https url")
        return self


class NotificationSettings(_Section):
    """Critical findings to people: each to every receiver, once, through a durable
    outbox with its own retries (a receiver down waits, with backoff)."""

    receivers: tuple[NotificationReceiver, ...] = ()
    timeout_s: float = Field(default=10.0, gt=0)
    retry_delay_s: float = Field(default=5.0, ge=0)
    max_retry_delay_s: float = Field(default=300.0, ge=0)
    retry_horizon_s: float = Field(default=86400.0, gt=0)

    @model_validator(mode="after")
    def _unique_names(self) -> NotificationSettings:
        names = [r.name for r in self.receivers]
        if len(set(names)) != len(names):
            raise ValueError("notification receivers need names of their own")
        return self

    def receiver(self, name: str) -> NotificationReceiver | None:
        return next((r for r in self.receivers if r.name == name), None)


class PluginSettings(_Section):
    """Which installed plugins run. ``enabled`` None: every installed one but the
    opt-in ones (``PluginSpec.opt_in``), which run only where it lists them."""

    enabled: tuple[str, ...] | None = None


def _host_name() -> str:
    """This host's name, cut to what a node name may be."""
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return name.strip("._-")[:64] or "infergate"


class NodeSettings(_Section):
    """This gateway node: its name is on every log line (``node``), on the metrics
    (``infergate_node_info``) and on each job it runs (the job record's ``node``)."""

    name: str = Field(default_factory=_host_name, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # json: one JSON object a line; console: readable lines; auto: console on a
    # terminal, JSON otherwise (a file, journald, a container's log).
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    """All of Infergate's configuration. Frozen once loaded."""

    model_config = SettingsConfigDict(
        env_prefix="INFERGATE_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    ingest: IngestSettings = IngestSettings()
    storage: StorageSettings = StorageSettings()
    assembly: AssemblySettings = AssemblySettings()
    routing: RoutingSettings = RoutingSettings()
    volume: VolumeSettings = VolumeSettings()
    plugins: PluginSettings = PluginSettings()
    ops: OpsSettings = OpsSettings()
    triton: TritonSettings = TritonSettings()
    results: ResultsSettings = ResultsSettings()
    notifications: NotificationSettings = NotificationSettings()
    export: ExportSettings = ExportSettings()
    work: WorkSettings = WorkSettings()
    retention: RetentionSettings = RetentionSettings()
    logging: LoggingSettings = LoggingSettings()
    node: NodeSettings = NodeSettings()

    @property
    def node_dir(self) -> Path:
        """This node's own folder under ``storage.var_dir`` (which nodes may share): the
        embedded Triton's files and the listeners' metrics."""
        return self.storage.var_dir / "nodes" / self.node.name

    def for_child_process(self) -> str:
        """These settings as JSON for a process of ours (a listener, a job), without
        the ops token, which they do not need (and which would be written masked)."""
        return self.model_dump_json(exclude={"ops": {"token"}})

    def destination_for(self, called_ae: str) -> Destination | None:
        """Where the results of a series sent to ``called_ae`` go."""
        return self.ingest.called_ae(called_ae).destination or self.export.destination

    def sender_destination(
        self, called_ae: str, calling_ae: str, address: str | None
    ) -> Destination | None:
        """The sender as a destination, when results return to it for ``called_ae`` and
        a peer entry for it has a port; None otherwise."""
        wanted = self.ingest.called_ae(called_ae).return_to_sender
        if not (self.export.return_to_sender if wanted is None else wanted) or address is None:
            return None
        for peer in self.ingest.peers:
            if (
                peer.port is not None
                and peer.ae_title == calling_ae
                and peer.matches(calling_ae, address)
            ):
                return Destination(ae_title=calling_ae, host=address, port=peer.port)
        return None

    def destinations(self) -> list[Destination]:
        """Every destination the settings name."""
        named = [
            self.export.destination,
            self.routing.unmatched.destination,
            *(c.destination for c in self.ingest.called_aes),
        ]
        found = []
        for first in named:
            current = first
            while current is not None:  # with its alternates, and theirs
                found.append(current)
                current = current.alternate
        return found

    def configured_destination(self, recorded: Destination) -> Destination:
        """The configured destination a delivery recorded (by AE title, host and port),
        with its TLS settings; the recorded one if the settings no longer name it."""
        for destination in self.destinations():
            if destination.key == recorded.key:
                return destination
        return recorded

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init arguments; the environment wins over it.
        return (env_settings, init_settings)


def load_settings(path: Path | None = None) -> Settings:
    """Load settings from ``path`` (YAML) and the environment.

    Raises :class:`ConfigError` naming the offending key and the file.
    """
    source = str(path) if path is not None else "the defaults"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from exc


def _describe(exc: ValidationError, source: str) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}' in {source}")
        else:
            problems.append(
                f"invalid value for '{key}' in {source} or the environment: {error['msg']}"
            )
    return "; ".join(problems)
