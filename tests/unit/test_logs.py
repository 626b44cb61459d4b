from __future__ import annotations

import io
import json
import logging
import warnings

import structlog
from pydicom.dataset import Dataset

from infergate.logs import REDACTED, configure_logging, get_logger, phi_guard


def test_guard_redacts_patient_keys_and_dicom_objects() -> None:
    ds = Dataset()
    ds.PatientName = "DOE^JANE"
    event = phi_guard(
        None,
        "info",
        {
            "event": "x.y",
            "patient_name": "DOE^JANE",
            "PatientID": "123",
            "accession_number": "A1",
            "dataset": ds,
            "element": ds["PatientName"],
            "raw": b"DOE^JANE",
            "series_uid": "1.2.3",
        },
    )
    assert event["patient_name"] == REDACTED
    assert event["PatientID"] == REDACTED
    assert event["accession_number"] == REDACTED
    assert "DOE" not in str(event["dataset"])
    assert "DOE" not in str(event["element"])
    assert "DOE" not in str(event["raw"])
    assert event["series_uid"] == "1.2.3"


def test_json_lines_with_event_names_and_context() -> None:
    out = io.StringIO()
    configure_logging("info", out)
    with structlog.contextvars.bound_contextvars(job_id="j1"):
        get_logger("t").info("inference.job.done", patient_name="DOE^JANE", slices=3)
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert line["event"] == "inference.job.done"
    assert line["job_id"] == "j1"
    assert line["slices"] == 3
    assert line["patient_name"] == REDACTED
    assert line["level"] == "info"


def test_pynetdicom_debug_never_reaches_the_log_even_at_debug() -> None:
    out = io.StringIO()
    configure_logging("debug", out)
    logging.getLogger("pynetdicom.dsutils").debug("(0010,0010) PN [DOE^JANE]")
    logging.getLogger("highdicom.seg").info("copy Patient-related attributes")
    assert "DOE" not in out.getvalue()
    assert "copy Patient" not in out.getvalue()
    logging.getLogger("pynetdicom").warning("association aborted")
    assert json.loads(out.getvalue().strip())["event"] == "association aborted"


def test_warnings_are_logged_without_their_text() -> None:
    out = io.StringIO()
    before = warnings.showwarning
    try:
        configure_logging("info", out)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn('The string "DOE" is not a person name', UserWarning, stacklevel=1)
    finally:
        warnings.showwarning = before
    assert "DOE" not in out.getvalue()
    event = json.loads(out.getvalue().strip().splitlines()[-1])
    assert (event["event"], event["category"]) == ("python.warning", "UserWarning")


class _Terminal(io.StringIO):
    """A text stream that says it is a terminal, as sys.stdout does on one."""

    def isatty(self) -> bool:
        return True


def test_readable_lines_on_a_terminal_and_json_lines_elsewhere() -> None:
    terminal = _Terminal()
    configure_logging(stream=terminal)
    get_logger("t").info("serve.ready", port=11112, patient_name="SENTINEL^NAME")
    line = terminal.getvalue()
    assert "serve.ready" in line
    assert "port" in line
    assert not line.lstrip().startswith("{")
    assert "SENTINEL" not in line  # the guard runs before either renderer

    for stream, form in ((_Terminal(), "json"), (io.StringIO(), "auto")):
        configure_logging(stream=stream, form=form)  # type: ignore[arg-type]
        get_logger("t").info("serve.ready", port=11112)
        assert json.loads(stream.getvalue())["event"] == "serve.ready"

    console = io.StringIO()
    configure_logging(stream=console, form="console")
    get_logger("t").info("serve.ready")
    assert not console.getvalue().lstrip().startswith("{")


def test_every_line_names_the_node_its_own_and_the_libraries() -> None:
    out = io.StringIO()
    configure_logging("info", out, form="json", node="ig-node-2")
    get_logger("t").info("ingest.echo")
    logging.getLogger("uvicorn").warning("Shutting down")
    lines = [json.loads(line) for line in out.getvalue().strip().splitlines()]
    assert [line["node"] for line in lines] == ["ig-node-2", "ig-node-2"]
