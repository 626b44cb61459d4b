"""Every code in a DICOM object checked against the dictionaries: what the tests ask of
each SEG and SR we write, and what a plugin author can ask of theirs."""

from __future__ import annotations

from collections.abc import Iterator

from pydicom.dataset import Dataset

from infergate.codes import known_meanings


def _items(ds: Dataset, where: str) -> Iterator[tuple[str, Dataset]]:
    yield where, ds
    for element in ds:
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                yield from _items(item, f"{where}.{element.keyword}[{index}]")


def code_problems(ds: Dataset) -> list[str]:
    """One line per coded concept in ``ds`` (at any depth) that pydicom's code
    dictionary and Infergate's list (``infergate.codes``) do not know, or know under
    another meaning (compared without regard to case); none when every code is right."""
    problems = []
    seen: set[tuple[str, str, str]] = set()
    for where, item in _items(ds, "dataset"):
        if "CodingSchemeDesignator" not in item or not any(
            keyword in item for keyword in ("CodeValue", "LongCodeValue", "URNCodeValue")
        ):
            continue  # not a code: a scheme's identification, say
        value = str(
            item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue") or ""
        )
        scheme, meaning = str(item.CodingSchemeDesignator), str(item.get("CodeMeaning", ""))
        if (scheme, value, meaning) in seen:
            continue
        seen.add((scheme, value, meaning))
        known = known_meanings(scheme, value)
        if not known:
            problems.append(f"({value}, {scheme}, {meaning!r}) at {where}: an unknown code")
        elif meaning.casefold() not in {m.casefold() for m in known}:
            problems.append(
                f"({value}, {scheme}, {meaning!r}) at {where}: that code means"
                f" {' or '.join(repr(m) for m in sorted(known))}"
            )
    return problems
