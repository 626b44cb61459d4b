"""Logging: structlog JSON lines on stdout (readable lines on a terminal), with a guard
against patient data.

Every event has a stable dotted name (``ingest.instance.stored``) and carries the
correlation ids bound in context (association, series, job). The PHI guard is the
last line of defence: code must never pass patient data to a logger, and the guard
redacts anything that looks like it, at every level.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

# Keys that name patient or visit identity. Matching is on the normalised key.
_PHI_KEYS = frozenset(
    {
        "patientname",
        "patientid",
        "patientbirthdate",
        "patientbirthtime",
        "patientsex",
        "patientage",
        "patientaddress",
        "otherpatientids",
        "otherpatientnames",
        "accessionnumber",
        "referringphysicianname",
        "performingphysicianname",
        "institutionaladdress",
        "name",
        "birthdate",
        "mrn",
    }
)
REDACTED = "[redacted]"


def _normalise(key: str) -> str:
    return key.replace("_", "").replace("-", "").replace(" ", "").lower()


def phi_guard(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Redact patient-identifying keys and any DICOM object passed as a value."""
    for key in list(event_dict):
        value = event_dict[key]
        if _normalise(key) in _PHI_KEYS:
            event_dict[key] = REDACTED
        elif isinstance(value, Dataset | DataElement | PersonName | bytes):
            # A dataset or element can hold anything; only its type is safe to show.
            event_dict[key] = f"[{type(value).__name__} not logged]"
    return event_dict


def _shared_processors() -> list[structlog.types.Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        phi_guard,
    ]


def _on_node(node: str) -> structlog.types.Processor:
    """A processor naming this gateway node on every event (``node.name``)."""

    def add(
        _logger: object, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict.setdefault("node", node)
        return event_dict

    return add


def configure_logging(
    level: str = "info",
    stream: TextIO | None = None,
    form: Literal["auto", "json", "console"] = "auto",
    node: str | None = None,
) -> None:
    """Send structlog and stdlib logging to ``stream`` (stdout): JSON lines, or readable
    lines (structlog's console renderer) for ``form`` "console", or "auto" on a
    terminal; each event names ``node`` when given."""
    out = stream if stream is not None else sys.stdout
    numeric = logging.getLevelNamesMapping()[level.upper()]
    console = form == "console" or (form == "auto" and out.isatty())
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    shared = [*_shared_processors(), *([] if node is None else [_on_node(node)])]
    structlog.configure(
        processors=[
            *shared,
            *([] if console else [structlog.processors.dict_tracebacks]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line: listener processes share stdout, and a line written in two
        # parts (print writes the newline apart) can interleave with another's.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(numeric, logging.INFO))
    # pynetdicom's debug output dumps whole datasets, patient module included, so
    # it stays at WARNING whatever level Infergate runs at.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom narrates every module it copies at INFO; that is not an operator's event.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    warnings.showwarning = _log_warning


def _log_warning(  # noqa: PLR0917 - the signature is warnings.showwarning's
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Python warnings as log events, without their text.

    Library warnings quote the values they complain about: highdicom's person-name
    warning quotes the patient's name. Only where and what kind is logged.
    """
    get_logger("py.warnings").warning(
        "python.warning", category=category.__name__, location=f"{filename}:{lineno}"
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger for a module; events are named by the caller (``ingest.instance.stored``)."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
