"""Identity of result objects: deterministic UIDs and the device, from config and the job.

UIDs are derived from the configured root and the job id, never drawn at random,
so a job that runs again after a crash produces objects with the same UIDs and a
PACS sees a re-send, not a second result. A series processed again (a late instance
opened a new generation) gets new objects under its new job; its SR names the earlier
SR in its Predecessor Documents Sequence, so a reader knows which report replaces which.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

from infergate.codes import ARTIFICIAL_INTELLIGENCE, PROCESSING_EQUIPMENT, Code
from infergate.config import DeviceSettings
from infergate.plugin_api import PluginSpec


def derived_uid(root: str, job_id: str, purpose: str) -> str:
    """A UID under ``root`` that is the same for the same job and purpose."""
    return str(generate_uid(prefix=root, entropy_srcs=[job_id, purpose]))


@dataclass(frozen=True)
class ResultIdentity:
    """UIDs and numbering of one job's result objects, plus who made them."""

    job_id: str
    uid_root: str
    device: DeviceSettings
    seg_series_number: int
    sr_series_number: int
    # The job of the series' earlier generation, same plugin, whose results these
    # supersede (a late instance made the series run again); None for the first.
    supersedes: str | None = None
    # The version of the Triton model that ran ("" when unknown).
    model_version: str = ""

    def uid(self, purpose: str) -> str:
        return derived_uid(self.uid_root, self.job_id, purpose)

    def device_uid(self, spec: PluginSpec) -> str:
        """The algorithm as a device (the SR's observer, IHE AI Results): one UID per
        plugin version and model version, the same for every job they run."""
        what = f"{spec.name} {spec.version} {spec.model_name} {self.model_version}"
        return derived_uid(self.uid_root, what, "device")

    def predecessor_sr(self, study_uid: str) -> Dataset | None:
        """What the SR of the superseded job was, for the new SR's Predecessor Documents
        Sequence: its UIDs are derived from that job as these are from this one."""
        if self.supersedes is None:
            return None
        earlier = Dataset()
        earlier.StudyInstanceUID = study_uid
        earlier.SeriesInstanceUID = derived_uid(self.uid_root, self.supersedes, "sr-series")
        earlier.SOPInstanceUID = derived_uid(self.uid_root, self.supersedes, "sr-instance")
        earlier.SOPClassUID = Comprehensive3DSRStorage
        return earlier


def coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def algorithm(spec: PluginSpec, model_version: str) -> hd.AlgorithmIdentificationSequence:
    """The plugin as DICOM's Algorithm Identification (IHE AIR), with the Triton model
    and the version of it that ran as its parameters."""
    return hd.AlgorithmIdentificationSequence(
        name=spec.name,
        family=coded(ARTIFICIAL_INTELLIGENCE),
        version=spec.version,
        source="Infergate plugin",
        parameters=model_parameters(spec, model_version),
    )


def model_parameters(spec: PluginSpec, model_version: str) -> dict[str, str]:
    return {"triton_model": spec.model_name, "triton_model_version": model_version or "unknown"}


def contributing_equipment(device: DeviceSettings, spec: PluginSpec) -> hd.ContributingEquipment:
    """Infergate and the plugin, as Contributing Equipment of a result object."""
    return hd.ContributingEquipment(
        manufacturer=device.manufacturer,
        manufacturer_model_name=device.manufacturer_model_name,
        software_versions=f"{spec.name} {spec.version}",
        device_serial_number=device.device_serial_number,
        purpose_of_reference=coded(PROCESSING_EQUIPMENT),
        institution_name=device.institution_name,
    )
