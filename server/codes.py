"""Every coded concept Infergate and its reference plugins write, from one place.

DICOM's own codes (DCM), SNOMED CT (SCT), LOINC (LN) and UCUM units come from
pydicom's code dictionary, which is generated from DICOM PS3.16: a code is named by
its keyword (``dicom_code("SCT", "Lung")``), never typed as a triple. The few that
dictionary lacks are in :data:`NOT_IN_DICTIONARY`, each with where it comes from (and
those it names otherwise than the templates do in :data:`TEMPLATE_MEANINGS`), and
Infergate's private codes (scheme ``99INFERGATE``) in :data:`PRIVATE`; nothing else is
written by hand. :func:`known_meanings` is what the tests check every code of every
object we produce against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from pydicom.sr.codedict import Collection, codes


@dataclass(frozen=True)
class Code:
    """A coded concept: code value, coding scheme designator, code meaning."""

    value: str
    scheme: str
    meaning: str


def dicom_code(scheme: str, keyword: str) -> Code:
    """The concept pydicom's dictionary (DICOM PS3.16) has under ``keyword`` in
    ``scheme``, e.g. ``dicom_code("SCT", "Lung")``; raises ``AttributeError`` naming a
    keyword it does not have."""
    found = getattr(getattr(codes, scheme), keyword)
    return Code(str(found.value), str(found.scheme_designator), str(found.meaning))


# Codes DICOM uses that pydicom's dictionary does not list: (scheme, value) -> meaning.
NOT_IN_DICTIONARY: dict[tuple[str, str], str] = {
    # UCUM's case-sensitive code for the millilitre (ucum.org); PS3.16 lists units by
    # context group, and its volume units do not include it.
    ("UCUM", "mL"): "milliliter",
    # SNOMED CT 399208008 |Plain chest X-ray (procedure)|: the procedure a chest
    # radiograph's report is about (TID 1500 Procedure Reported, CID 100 extensible).
    ("SCT", "399208008"): "Plain chest X-ray",
    # The language highdicom writes for a report's content (TID 1204), RFC 5646.
    ("RFC5646", "en-US"): "English (United States)",
    # The units of an Image Library entry's descriptors (TID 1602: rows and columns,
    # the direction cosines of Image Orientation), as PS3.16's template gives them.
    ("UCUM", "{pixels}"): "Pixels",
    ("UCUM", "{-1:1}"): "{-1:1}",
}

# Codes the dictionary has under another display name than the one PS3.16's template
# tables give them, which highdicom's template classes write.
TEMPLATE_MEANINGS: dict[tuple[str, str], str] = {
    # The Image Library's entries (TID 1601 row 1): "Source"; the code table's display
    # name is "Source (attribute)".
    ("SCT", "260753009"): "Source",
}

PRIVATE_SCHEME = "99INFERGATE"
# Infergate's private codes, for concepts no public coding scheme has: value -> meaning.
PRIVATE: dict[str, str] = {
    "IG-INVERTED": "Grayscale inverted against Photometric",
    "IG-CLIPPED": "Exposure clipped in lung fields",
    "IG-ROTIDX": "Mediastinal offset (rotation index)",
    "IG-CLIPPCT": "Lung field pixels clipped",
}


def listed_code(scheme: str, value: str) -> Code:
    """A code from :data:`NOT_IN_DICTIONARY`, or a private one (``PRIVATE_SCHEME``)."""
    if scheme == PRIVATE_SCHEME:
        return Code(value, scheme, PRIVATE[value])
    return Code(value, scheme, NOT_IN_DICTIONARY[(scheme, value)])


@cache
def _dictionary() -> dict[tuple[str, str], frozenset[str]]:
    """(scheme, value) -> every meaning pydicom's dictionary gives it."""
    meanings: dict[tuple[str, str], set[str]] = {}
    for scheme in codes.schemes():
        for concept in Collection(scheme).concepts.values():
            key = (str(concept.scheme_designator), str(concept.value))
            meanings.setdefault(key, set()).add(str(concept.meaning))
    return {key: frozenset(found) for key, found in meanings.items()}


def known_meanings(scheme: str, value: str) -> frozenset[str]:
    """The meanings ``value`` has in ``scheme``: pydicom's dictionary's, or ours for
    what it lacks and for private codes; empty when no one knows the code."""
    if scheme == PRIVATE_SCHEME:
        return frozenset({PRIVATE[value]}) if value in PRIVATE else frozenset()
    found = _dictionary().get((scheme, value), frozenset())
    for listed in (NOT_IN_DICTIONARY, TEMPLATE_MEANINGS):
        if (scheme, value) in listed:
            found |= {listed[scheme, value]}
    return found


# -- what Infergate itself writes ------------------------------------------------
ARTIFICIAL_INTELLIGENCE = dicom_code("DCM", "ArtificialIntelligence")  # algorithm family
PROCESSING_EQUIPMENT = dicom_code("DCM", "ProcessingEquipment")  # contributing equipment

# -- shared by plugins (plugin_api re-exports them) -------------------------------
ANATOMICAL_STRUCTURE = dicom_code("SCT", "AnatomicalStructure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = dicom_code("SCT", "MorphologicallyAbnormalStructure")
VOLUME = dicom_code("SCT", "Volume")
FINDING = dicom_code("DCM", "Finding")
PRESENT = dicom_code("SCT", "Present")
ABSENT = dicom_code("SCT", "Absent")
LATERALITY = dicom_code("SCT", "Laterality")
RIGHT = dicom_code("SCT", "Right")
LEFT = dicom_code("SCT", "Left")
BILATERAL = dicom_code("SCT", "Bilateral")  # CID 244: right and left
IMAGING_PROCEDURE = dicom_code("SCT", "ImagingProcedure")
LUNG = dicom_code("SCT", "Lung")
BRAIN = dicom_code("SCT", "Brain")
HEMORRHAGE = dicom_code("SCT", "Hemorrhage")  # CID 7151: a segmented property type
MILLILITER = listed_code("UCUM", "mL")
NO_UNITS = dicom_code("UCUM", "NoUnits")
PERCENT = dicom_code("UCUM", "Percent")
