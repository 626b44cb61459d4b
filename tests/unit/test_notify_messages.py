"""The messages of a critical finding: valid for their standards' libraries, carrying
the finding's codes and the identifiers a receiver matches on, and no more patient
data than that (sentinels)."""

from __future__ import annotations

import datetime
import json

import hl7
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from hl7apy.parser import parse_message

from infergate.codes import HEMORRHAGE, PRESENT
from infergate.notify import messages
from infergate.store import CriticalFinding

FINDING = CriticalFinding(
    HEMORRHAGE, PRESENT, None, "ct_head_bleed", "1.0.0", "Head CT hemorrhage triage", "1.2.3.9"
)
STUDY = messages.Study("1.2.3", "ACC-PHI-2026", "PHI-ID-47110815", "")
AT = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
SENTINELS = ("PHANTOM^LUNGS^TESTCASE", "19450704")


def test_the_webhook_says_what_was_found_where_and_by_whom_without_the_patient() -> None:
    payload = messages.webhook("n-1", FINDING, STUDY)
    text = json.dumps(payload)
    assert payload["finding"]["name"]["code"] == "50960005"
    assert payload["finding"]["value"]["display"] == "Present"
    assert payload["study_instance_uid"] == "1.2.3"
    assert payload["accession_number"] == "ACC-PHI-2026"
    assert payload["report_sop_instance_uid"] == "1.2.3.9"
    assert STUDY.patient_id not in text
    for sentinel in SENTINELS:
        assert sentinel not in text


def test_the_fhir_report_is_valid_r4_with_the_finding_as_a_critical_observation() -> None:
    report = messages.diagnostic_report("n-1", FINDING, STUDY, AT)
    text = report.model_dump_json(exclude_none=True)
    again = DiagnosticReport.model_validate_json(text)
    assert again.status == "preliminary"
    assert again.identifier is not None
    assert again.identifier[0].value == "urn:oid:1.2.3.9"
    assert again.subject is not None
    assert again.subject.identifier is not None
    assert again.subject.identifier.value == STUDY.patient_id
    (observation,) = json.loads(text)["contained"]
    assert observation["interpretation"][0]["coding"][0]["code"] == "AA"
    assert observation["valueCodeableConcept"]["coding"][0]["code"] == "52101004"
    assert "ACC-PHI-2026" in text
    for sentinel in SENTINELS:
        assert sentinel not in text


def test_the_hl7_message_is_a_valid_oru_r01_with_the_finding_flagged_critical() -> None:
    message = messages.oru_r01(
        "0a1b2c3d-0000-1111-2222-333344445555",
        FINDING,
        STUDY,
        sending=("INFERGATE", "RADIOLOGY"),
        receiving=("RIS", "HOSPITAL"),
        at=AT,
    )
    parsed = parse_message(message, validation_level=1)  # strict: hl7apy raises if invalid
    assert parsed.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    read = hl7.parse(message)
    assert str(read.segment("MSH")[10]) == "0a1b2c3d000011112222"
    assert str(read.segment("PID")[3]) == STUDY.patient_id
    assert str(read.segment("PID")[5]) == '""'  # the name is not sent
    obx = read.segment("OBX")
    assert (str(obx[3][0][0]), str(obx[5][0][1]), str(obx[8])) == ("50960005", "Present", "AA")
    assert str(read.segment("OBR")[3]) == "ACC-PHI-2026"
    for sentinel in SENTINELS:
        assert sentinel not in message
