"""The gateway's probes: alive (``/healthz``) and ready for work (``/readyz``).

Each check is computed when asked, so the answers follow reality within the time a
check takes (a Triton call is given 2 s). A finding names what it checked and, when it
fails, why, without patient data.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from infergate.config import Settings
from infergate.errors import StoreError
from infergate.inference.endpoints import Endpoints
from infergate.ingest.admission import space_shortfall
from infergate.ingest.listener_pool import ListenerPool
from infergate.plugins import LoadedPlugin
from infergate.store import Store
from infergate.work.loops import StageLoop


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    reason: str | None = None


@dataclass
class Gateway:
    """The parts of a running gateway the probes look at."""

    settings: Settings
    store: Store
    triton: Endpoints
    plugins: list[LoadedPlugin]
    stages: list[StageLoop]
    listeners: ListenerPool


def liveness(gateway: Gateway) -> list[Finding]:
    """Every stage loop runs, and the listener processes are up (a dead one is
    restarted by the watchdog within seconds; until then the gateway is not whole)."""
    findings = []
    for stage in gateway.stages:
        if stage.failure is not None:
            findings.append(Finding(f"stage {stage.name}", False, stage.failure))
        elif not stage.is_alive():
            findings.append(Finding(f"stage {stage.name}", False, "its thread has ended"))
        else:
            findings.append(Finding(f"stage {stage.name}", True))
    findings.append(_listeners(gateway))
    return findings


def readiness(gateway: Gateway) -> list[Finding]:
    """Work can be taken and done: listeners bound, the store writable, free space
    above ``ingest.min_free_bytes``, Triton ready, each enabled plugin's model loaded."""
    findings = [_listeners(gateway), _store(gateway), _free_space(gateway)]
    # Asked now, not as of the health loop's last round: a probe sees a Triton that
    # just went away.
    triton_ready = bool(gateway.triton.check())
    findings.append(
        Finding("triton", triton_ready, None if triton_ready else "Triton is not ready")
    )
    for loaded in gateway.plugins:
        spec = loaded.spec
        check = f"model {spec.model_name} (plugin {spec.name})"
        if not triton_ready:
            findings.append(Finding(check, False, "Triton is not ready"))
        elif gateway.triton.model_ready(spec.model_name, spec.model_version):
            findings.append(Finding(check, True))
        else:
            findings.append(Finding(check, False, "the model is not loaded"))
    return findings


def _listeners(gateway: Gateway) -> Finding:
    alive, configured = gateway.listeners.alive(), gateway.settings.ingest.listener_processes
    if alive == configured:
        return Finding("listener processes", True)
    return Finding("listener processes", False, f"{alive} of {configured} are up")


def _store(gateway: Gateway) -> Finding:
    try:
        gateway.store.check_writable()
    except StoreError as exc:
        return Finding("state store", False, str(exc))
    return Finding("state store", True)


def _free_space(gateway: Gateway) -> Finding:
    free = shutil.disk_usage(gateway.settings.storage.spool_dir).free
    shortfall = space_shortfall(free, gateway.settings.ingest)  # the listener's own test
    return Finding("free space", shortfall is None, shortfall)
