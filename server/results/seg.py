"""DICOM-SEG (BINARY) from a plugin's label map, through highdicom's constructor."""

from __future__ import annotations

import highdicom as hd
import numpy as np

from infergate.errors import ResultEncodingError
from infergate.plugin_api import Findings, PluginSpec
from infergate.results.identity import (
    ResultIdentity,
    algorithm,
    coded,
    contributing_equipment,
)
from infergate.results.sources import SourceSlices


def seg_segment_numbers(findings: Findings) -> dict[int, int]:
    """Plugin segment number -> SEG segment number (DICOM wants 1..N without gaps)."""
    return {number: index for index, number in enumerate(sorted(findings.segment_numbers), 1)}


def build_segmentation(
    source: SourceSlices,
    findings: Findings,
    spec: PluginSpec,
    identity: ResultIdentity,
) -> hd.seg.Segmentation:
    """A SEG in the source study referencing ``source`` (the acquired slices, in the
    label map's order): its single-frame instances, or its one multi-frame instance
    with the label map in that instance's frame order."""
    if findings.label_map is None or not findings.segment_numbers:
        raise ResultEncodingError(f"plugin {spec.name} found no segment to encode")
    numbering = seg_segment_numbers(findings)
    label_map = findings.label_map
    renumbered = any(plugin != seg for plugin, seg in numbering.items())
    if renumbered or int(label_map.max()) > len(numbering):
        # Through a table (labels that are no segment become background): a gather over
        # the whole label map, several times slower than the maximum, so only when needed.
        lookup = np.zeros(256, dtype=np.uint8)
        for plugin_number, seg_number in numbering.items():
            lookup[plugin_number] = seg_number
        label_map = lookup[label_map]
    if source.multiframe:
        source_images, label_map = source.instances, source.in_source_order(label_map)
    else:
        source_images = list(source.headers)
    descriptions = []
    for plugin_number, seg_number in numbering.items():
        segment = spec.segment(plugin_number)
        description = hd.seg.SegmentDescription(
            segment_number=seg_number,
            segment_label=segment.label,
            segmented_property_category=coded(segment.category),
            segmented_property_type=coded(segment.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues[segment.algorithm_type],
            algorithm_identification=algorithm(spec, identity.model_version),
            tracking_uid=identity.uid(f"segment-{plugin_number}"),
            tracking_id=segment.label,
            anatomic_regions=None if segment.site is None else [coded(segment.site)],
        )
        if segment.laterality is not None:
            # highdicom takes no modifier; the attribute is the standard's (C.8.20.2).
            (property_type,) = description.SegmentedPropertyTypeCodeSequence
            property_type.SegmentedPropertyTypeModifierCodeSequence = [coded(segment.laterality)]
        descriptions.append(description)
    device = identity.device
    try:
        return hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=label_map,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=identity.uid("seg-series"),
            series_number=identity.seg_series_number,
            sop_instance_uid=identity.uid("seg-instance"),
            instance_number=1,
            manufacturer=device.manufacturer,
            manufacturer_model_name=device.manufacturer_model_name,
            software_versions=device.software_versions,
            device_serial_number=device.device_serial_number,
            institution_name=device.institution_name,
            content_description=f"{spec.name} {spec.version}"[:64],
            content_label=spec.name.upper().replace("-", "_")[:16],
            series_description=spec.series_description("SEG"),
            contributing_equipment=[contributing_equipment(device, spec)],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultEncodingError(f"SEG for plugin {spec.name} cannot be built: {exc}") from exc
