"""Codes come from the dictionaries: the constants Infergate and the reference plugins
write, and the check every SEG and SR of the tests goes through, which must catch a
code typed with the wrong meaning (as two of ours once were)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from infergate import codes
from infergate.plugin_api import Code
from infergate.plugins import discover
from infergate.testing import code_problems


def _coded(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def test_codes_typed_with_the_wrong_meaning_are_caught() -> None:
    ds = Dataset()
    equipment = Dataset()
    # What we once wrote: 109104 is De-identifying Equipment, 123109 Manual Processing.
    equipment.PurposeOfReferenceCodeSequence = Sequence(
        [_coded("109104", "DCM", "Processing Equipment")]
    )
    ds.ContributingEquipmentSequence = Sequence([equipment])
    ds.AlgorithmFamilyCodeSequence = Sequence([_coded("123109", "DCM", "Artificial Intelligence")])
    ds.ConceptCodeSequence = Sequence([_coded("3341006", "SCT", "Right lung")])
    problems = {problem.split(")")[0] + ")": problem for problem in code_problems(ds)}
    assert len(problems) == 3
    equipment_problem = problems["(109104, DCM, 'Processing Equipment')"]
    assert "that code means 'De-identifying Equipment'" in equipment_problem
    assert "ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0]" in equipment_problem
    family_problem = problems["(123109, DCM, 'Artificial Intelligence')"]
    assert "that code means 'Manual Processing'" in family_problem
    assert "an unknown code" in problems["(3341006, SCT, 'Right lung')"]


def test_the_right_codes_pass_whatever_their_case() -> None:
    ds = Dataset()
    ds.ConceptCodeSequence = Sequence(
        [
            _coded("109102", "DCM", "Processing Equipment"),
            _coded("123110", "DCM", "Artificial Intelligence"),
            _coded("121233", "DCM", "Source Image for Segmentation"),  # highdicom's case
            _coded("IG-ROTIDX", "99INFERGATE", "Mediastinal offset (rotation index)"),
            _coded("mL", "UCUM", "milliliter"),
        ]
    )
    assert code_problems(ds) == []


def _spec_codes(value: object) -> list[Code]:
    """Every Code in a plugin's spec, segments included."""
    if isinstance(value, Code):
        return [value]
    if isinstance(value, tuple):
        return [code for item in value for code in _spec_codes(item)]
    if hasattr(value, "__dataclass_fields__"):
        return [
            code
            for name in value.__dataclass_fields__
            for code in _spec_codes(getattr(value, name))
        ]
    return []


@pytest.mark.parametrize("name", ["ct_lung", "ct_head_bleed", "cxr_quality"])
def test_every_code_of_a_reference_plugin_is_known_with_its_meaning(name: str) -> None:
    (loaded,) = [p for p in discover() if p.spec.name == name]
    found = _spec_codes(loaded.spec)
    assert found
    for code in found:
        assert code.meaning in codes.known_meanings(code.scheme, code.value), code


def test_every_listed_code_says_it_is_not_in_the_dictionary_for_a_reason() -> None:
    """A code in NOT_IN_DICTIONARY that pydicom's dictionary has after all belongs there."""
    for (scheme, value), meaning in codes.NOT_IN_DICTIONARY.items():
        assert codes.known_meanings(scheme, value) == {meaning}, (scheme, value)
    for (scheme, value), meaning in codes.TEMPLATE_MEANINGS.items():
        dictionary = codes.known_meanings(scheme, value) - {meaning}
        assert dictionary, f"{scheme} {value}: pydicom's dictionary lacks it"
        assert meaning not in dictionary
