"""The conformance check a plugin must pass, without Triton or DICOM.

``check_plugin`` validates the spec, calls ``preprocess`` on a synthetic series of
each modality the plugin accepts and compares what comes back with the declared
inputs (names, dtypes, ranks, fixed sizes); then calls ``postprocess`` with outputs
shaped as declared (all zeros, and filled with each declared segment number in
turn) and checks the findings against the spec: label map shape and dtype,
segments declared, measurements and evaluations about segments and images that
exist. It
also checks that neither function changes the series it is given.

    from infergate.testing import check_plugin
    assert check_plugin(my_plugin) == []
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import numpy.typing as npt
from tritonclient.utils import triton_to_np_dtype

from infergate.dicom.geometry import PROJECTION_MODALITIES
from infergate.errors import PluginError
from infergate.plugin_api import Findings, Plugin, PluginSpec, Series, TensorSpec
from infergate.plugins import pickling_error, validate

_SHAPE = (8, 32, 64)  # slices, rows, columns of the synthetic series


def synthetic_series(
    modality: str, shape: tuple[int, int, int] = _SHAPE, volume_type: str = "float32"
) -> Series:
    """A small series of ``modality``: air around a body-like block (CT values in HU),
    280 mm across, as wide as an adult's trunk, its volume of ``volume_type`` and
    read-only, as the gateway gives it.

    For a projection modality (CR, DX, ...) one image, as displayed: a bright block
    on a dark background.
    """
    series = _synthetic(modality, shape)
    volume = series.volume.astype(volume_type)
    volume.flags.writeable = False
    return replace(series, volume=volume)


def _synthetic(modality: str, shape: tuple[int, int, int]) -> Series:
    if modality.upper() in PROJECTION_MODALITIES:
        _, rows, columns = shape
        image = np.full((1, rows, columns), 0.05, dtype=np.float32)
        image[:, rows // 4 : 3 * rows // 4, columns // 4 : 3 * columns // 4] = 0.6
        return Series(
            modality=modality,
            volume=image,
            spacing=(0.0, 0.5, 0.5),
            row_direction=(1.0, 0.0, 0.0),
            column_direction=(0.0, 0.0, -1.0),
            origin=(0.0, 0.0, 0.0),
            projection=True,
        )
    volume = np.full(shape, -1000.0, dtype=np.float32)
    _, rows, columns = shape
    volume[:, rows // 4 : 3 * rows // 4, columns // 8 : 7 * columns // 8] = 40.0
    return Series(
        modality=modality,
        volume=volume,
        spacing=(10.0, 5.0, 5.0),  # 0.25 mL voxels
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        origin=(0.0, 0.0, 0.0),
    )


def check_plugin(plugin: object) -> list[str]:
    """What is wrong with ``plugin``: one line per problem, none when it conforms."""
    try:
        checked = validate(plugin, "the plugin under test")
    except PluginError as exc:
        return [str(exc)]
    spec = checked.spec
    problems: list[str] = []
    error = pickling_error(checked)
    if error is not None:
        problems.append(f"the plugin object cannot be pickled ({type(error).__name__}: {error})")
    for modality in sorted(spec.modalities):
        series = synthetic_series(modality, volume_type=spec.volume_type)
        before = series.volume.copy()
        try:
            inputs = checked.preprocess(series)
        except Exception as exc:  # the plugin's own code may raise anything
            problems.append(f"preprocess raised {type(exc).__name__} on a {modality} series: {exc}")
            continue
        problems += _check_tensors("input", spec.inputs, inputs)
        for outputs in _model_outputs(spec, series, inputs):
            problems += _check_postprocess(checked, spec, series, outputs)
        if not np.array_equal(series.volume, before):
            problems.append(f"the {modality} series' volume was changed by the plugin")
    return problems


def _check_tensors(
    kind: str, specs: tuple[TensorSpec, ...], arrays: Mapping[str, npt.NDArray[np.generic]]
) -> list[str]:
    problems = []
    declared = {t.name for t in specs}
    if set(arrays) != declared:
        problems.append(f"{kind}s are {sorted(arrays)}, the spec declares {sorted(declared)}")
    for tensor in specs:
        array = arrays.get(tensor.name)
        if array is None:
            continue
        wanted = np.dtype(triton_to_np_dtype(tensor.datatype))
        if array.dtype != wanted:
            problems.append(f"{kind} {tensor.name} is {array.dtype}, declared {tensor.datatype}")
        if array.ndim != len(tensor.shape) or any(
            size not in (-1, got) for size, got in zip(tensor.shape, array.shape, strict=False)
        ):
            problems.append(
                f"{kind} {tensor.name} has shape {array.shape}, declared {tensor.shape}"
            )
    return problems


def _model_outputs(
    spec: PluginSpec, series: Series, inputs: Mapping[str, npt.NDArray[np.generic]]
) -> list[dict[str, npt.NDArray[np.generic]]]:
    """Outputs as the declared model could return them: zeros, then, for each declared
    segment, its number over a block of ~500 mL in the body, right of its midline (an
    organ of one side, a lesion). An output with the shape of an input (``shape_of``)
    has the shape the plugin gave that input (a volume padded for the model, say)."""
    fills = [0] + [segment.number for segment in spec.segments]
    variants = []
    for fill in fills:
        outputs = {}
        for tensor in spec.outputs:
            given = inputs.get(tensor.shape_of) if tensor.shape_of is not None else None
            shape = (
                tuple(given.shape)
                if given is not None
                else tuple(
                    (series.volume.shape[i] if len(tensor.shape) == 3 else 1)
                    if size == -1
                    else size
                    for i, size in enumerate(tensor.shape)
                )
            )
            dtype = np.dtype(triton_to_np_dtype(tensor.datatype))
            array = np.zeros(shape, dtype=dtype)
            if array.ndim == 3:
                _, rows, columns = array.shape
                array[:, rows // 4 : 3 * rows // 4, columns // 4 : columns // 2] = fill
            else:
                array[...] = fill
            outputs[tensor.name] = array
        variants.append(outputs)
    return variants


def _check_postprocess(
    plugin: Plugin,
    spec: PluginSpec,
    series: Series,
    outputs: dict[str, npt.NDArray[np.generic]],
) -> list[str]:
    try:
        findings = plugin.postprocess(series, outputs)
    except Exception as exc:  # the plugin's own code may raise anything
        return [f"postprocess raised {type(exc).__name__}: {exc}"]
    if not isinstance(findings, Findings):
        return [f"postprocess returned {type(findings).__name__}, not Findings"]
    problems = []
    declared = {segment.number for segment in spec.segments}
    undeclared = set(findings.segment_numbers) - declared
    if undeclared:
        problems.append(f"findings name segments {sorted(undeclared)} the spec does not declare")
    if findings.label_map is not None:
        labels = findings.label_map
        if labels.shape != series.volume.shape or labels.dtype != np.uint8:
            problems.append(
                f"label map is {labels.dtype} {labels.shape}, expected uint8 {series.volume.shape}"
            )
        present = {int(v) for v in np.unique(labels)} - {0}
        if not present <= set(findings.segment_numbers):
            problems.append(
                f"label map holds {sorted(present)} but findings list {findings.segment_numbers}"
            )
    listed = set(findings.segment_numbers)
    images = series.volume.shape[0]
    for kind, items in (
        ("measurement", findings.measurements),
        ("evaluation", findings.evaluations),
    ):
        for item in items:
            if item.segment_number is not None and item.segment_number not in listed:
                problems.append(f"a {kind} is about segment {item.segment_number}, not listed")
            if item.image_index is not None and not 0 <= item.image_index < images:
                problems.append(
                    f"a {kind} is about image {item.image_index}; the series has {images}"
                )
    return problems
