"""What a critical finding says to each kind of receiver, built with the standards'
own libraries: HL7 v2.5 ORU^R01 (hl7apy, validated against its structures), a FHIR
R4 DiagnosticReport with the finding as an Observation (fhir.resources' R4B models,
validated as they are built), and a JSON webhook.

No more patient data than the receiving system needs to put the finding with the
right study: the HL7 and FHIR messages carry the Patient ID (PID-3, the subject's
identifier) and the accession number, which an order-filling system matches on; the
webhook carries neither (a study and an accession number identify the study to a
person who opens it in the PACS). No name, birth date or sex goes anywhere.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from hl7apy.core import Message
from pydicom.dataset import Dataset

from infergate.codes import Code
from infergate.store.rows import CriticalFinding

# FHIR's system URIs for the coding schemes our codes come from.
_FHIR_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
}
_HL7_SYSTEMS = {"SCT": "SCT", "LN": "LN", "DCM": "DCM"}  # HL7 table 0396


@dataclass(frozen=True)
class Study:
    """What the report says of its study: the identifiers a receiver matches on."""

    study_uid: str
    accession_number: str
    patient_id: str
    issuer_of_patient_id: str

    @classmethod
    def of(cls, report: Dataset) -> Study:
        return cls(
            study_uid=str(report.StudyInstanceUID),
            accession_number=str(report.get("AccessionNumber", "") or ""),
            patient_id=str(report.get("PatientID", "") or ""),
            issuer_of_patient_id=str(report.get("IssuerOfPatientID", "") or ""),
        )


def _coding(code: Code) -> dict[str, str]:
    system = _FHIR_SYSTEMS.get(code.scheme, f"urn:infergate:scheme:{code.scheme}")
    return {"system": system, "code": code.value, "display": code.meaning}


def _statement(finding: CriticalFinding) -> str:
    where = "" if finding.segment_number is None else f" (segment {finding.segment_number})"
    return f"{finding.name.meaning}: {finding.value.meaning}{where}"


def webhook(notification_id: str, finding: CriticalFinding, study: Study) -> dict[str, Any]:
    """The JSON a webhook gets; ``id`` is the same for every attempt of one finding."""
    return {
        "id": notification_id,
        "event": "critical_finding",
        "finding": {
            "name": _coding(finding.name),
            "value": _coding(finding.value),
            "segment_number": finding.segment_number,
            "text": _statement(finding),
        },
        "algorithm": {
            "plugin": finding.plugin,
            "version": finding.plugin_version,
            "title": finding.title,
        },
        "study_instance_uid": study.study_uid,
        "accession_number": study.accession_number,
        "report_sop_instance_uid": finding.report_uid,
    }


def diagnostic_report(
    notification_id: str, finding: CriticalFinding, study: Study, issued: datetime.datetime
) -> DiagnosticReport:
    """A preliminary DiagnosticReport about the study, its finding a contained
    Observation interpreted as critical; identified by the SR's SOP Instance UID."""
    observation = Observation.model_validate(
        {
            "resourceType": "Observation",
            "id": "finding",
            "status": "preliminary",
            "code": {"coding": [_coding(finding.name)], "text": finding.name.meaning},
            "valueCodeableConcept": {
                "coding": [_coding(finding.value)],
                "text": finding.value.meaning,
            },
            "interpretation": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                            "code": "AA",
                            "display": "Critical abnormal",
                        }
                    ]
                }
            ],
            "note": [{"text": f"{finding.title} {finding.plugin_version}: algorithm result"}],
        }
    )
    identifier = {"system": "urn:dicom:uid", "value": f"urn:oid:{finding.report_uid}"}
    subject: dict[str, Any] = {"identifier": {"value": study.patient_id or "unknown"}}
    if study.issuer_of_patient_id:
        subject["identifier"]["system"] = f"urn:infergate:issuer:{study.issuer_of_patient_id}"
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": notification_id,
        "identifier": [identifier],
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {"text": f"{finding.title} (algorithm)"},
        "subject": subject,
        "issued": issued.isoformat(),
        "contained": [observation.model_dump(mode="json", exclude_none=True)],
        "result": [{"reference": "#finding"}],
        "conclusion": _statement(finding),
    }
    if study.accession_number:
        report["basedOn"] = [
            {
                "type": "ServiceRequest",
                "identifier": {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                "code": "ACSN",
                            }
                        ]
                    },
                    "value": study.accession_number,
                },
            }
        ]
    return DiagnosticReport.model_validate(report)


def _hl7_text(value: str) -> str:
    """A value fit for an HL7 field: no delimiter characters."""
    return "".join(" " if ch in "|^~\\&\r\n" else ch for ch in value)


def oru_r01(
    notification_id: str,
    finding: CriticalFinding,
    study: Study,
    *,
    sending: tuple[str, str],
    receiving: tuple[str, str],
    at: datetime.datetime,
) -> str:
    """An HL7 v2.5 ORU^R01, validated against hl7apy's structures; MSH-10 (the
    message control ID) is the notification's id, the same for every attempt."""
    message = Message("ORU_R01", version="2.5")
    stamp = at.strftime("%Y%m%d%H%M%S")
    message.msh.msh_3 = _hl7_text(sending[0])
    message.msh.msh_4 = _hl7_text(sending[1])
    message.msh.msh_5 = _hl7_text(receiving[0])
    message.msh.msh_6 = _hl7_text(receiving[1])
    message.msh.msh_7 = stamp
    message.msh.msh_9 = "ORU^R01^ORU_R01"
    message.msh.msh_10 = notification_id.replace("-", "")[:20]
    message.msh.msh_11 = "P"
    message.msh.msh_12 = "2.5"
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    patient = result.add_group("ORU_R01_PATIENT")
    patient.pid.pid_3 = _hl7_text(study.patient_id) or "UNKNOWN"
    # PID-5 is required; HL7's explicit null ("") says the name is not sent.
    patient.pid.pid_5 = '""'
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    order.obr.obr_1 = "1"
    order.obr.obr_3 = _hl7_text(study.accession_number)
    order.obr.obr_4 = f"{_hl7_text(finding.plugin)}^{_hl7_text(finding.title)}^L"
    order.obr.obr_7 = stamp
    order.obr.obr_25 = "P"  # preliminary
    observation = order.add_group("ORU_R01_OBSERVATION")
    obx = observation.obx
    obx.obx_1 = "1"
    obx.obx_2 = "CWE"
    name, value = finding.name, finding.value
    obx.obx_3 = (
        f"{name.value}^{_hl7_text(name.meaning)}^{_HL7_SYSTEMS.get(name.scheme, name.scheme)}"
    )
    obx.obx_5 = (
        f"{value.value}^{_hl7_text(value.meaning)}^{_HL7_SYSTEMS.get(value.scheme, value.scheme)}"
    )
    obx.obx_8 = "AA"  # critical abnormal (HL7 table 0078)
    obx.obx_11 = "P"
    obx.obx_14 = stamp
    message.validate()
    return str(message.to_er7())
