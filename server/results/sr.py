"""A TID 1500 measurement report (Comprehensive 3D SR) through highdicom's constructors.

Each measured segment becomes a volumetric measurement group that references the
SEG segment and its source (TID 1411: the source series, or the one multi-frame
instance with the frames the segment covers), and a planar group with its outline on
the slice where it is largest (a SCOORD polygon, for viewers that draw no SEG);
findings about one image (a radiograph's quality) become a measurement group that
references that image, and findings about the whole series a measurement group of
their own. The Image Library (TID 1600) describes each image the content references
by itself: the outlined slices, the images findings are about. All source images and
the SEG are recorded as evidence.

Why the series and not each slice: the SEG already references every source frame,
and a report listing each of a 300-slice series' images in the segment references
and the library took 15 s to build and 4.5 s to write (1.3 MB), against 0.35 s and
0.1 s now (``tests/benchmarks/bench_end_to_end.py --slices 300``): it grew with the
series, what it said did not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from infergate.errors import ResultEncodingError
from infergate.plugin_api import Evaluation, Findings, Measurement, PluginSpec, SegmentSpec
from infergate.results.identity import (
    ResultIdentity,
    coded,
    contributing_equipment,
    model_parameters,
)
from infergate.results.library import library_images
from infergate.results.outline import outline, pixels_per_slice
from infergate.results.seg import seg_segment_numbers
from infergate.results.sources import SourceSlices


def _algorithm_id(spec: PluginSpec, identity: ResultIdentity) -> hd.sr.AlgorithmIdentification:
    parameters = model_parameters(spec, identity.model_version)
    return hd.sr.AlgorithmIdentification(
        name=spec.name,
        version=spec.version,
        parameters=[f"{key}={value}" for key, value in parameters.items()],
    )


def _about(
    findings: Findings,
    spec: PluginSpec,
    identity: ResultIdentity,
    *,
    segment: int | None,
    image: int | None = None,
) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """The measurements and qualitative evaluations of ``findings`` about ``segment``,
    or, when it is None, about ``image`` (None: the whole series), as TID 1500 content."""

    def wanted(item: Measurement | Evaluation) -> bool:
        if segment is not None:
            return item.segment_number == segment
        return item.segment_number is None and item.image_index == image

    measurements = [
        hd.sr.Measurement(
            name=coded(m.name),
            value=m.value,
            unit=coded(m.unit),
            algorithm_id=_algorithm_id(spec, identity),
        )
        for m in findings.measurements
        if wanted(m)
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(name=coded(e.name), value=coded(e.value))
        for e in findings.evaluations
        if wanted(e)
    ]
    return measurements, evaluations


def _finding_site(segment: SegmentSpec) -> hd.sr.FindingSite:
    """Where the segment is (its site, or the anatomy it is), with its side if paired."""
    side = segment.laterality
    return hd.sr.FindingSite(
        anatomic_location=coded(segment.site or segment.type),
        laterality=None if side is None else coded(side),
    )


def _segment_groups(
    seg: Dataset,
    source: SourceSlices,
    findings: Findings,
    spec: PluginSpec,
    identity: ResultIdentity,
    *,
    per_slice: Mapping[int, npt.NDArray[np.int64]],
    pictured: dict[str, Dataset],
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    if findings.label_map is None:
        return []  # a SEG exists only with a label map
    numbering = seg_segment_numbers(findings)
    groups = []
    for plugin_number in sorted(numbering):
        segment = spec.segment(plugin_number)
        present = [int(index) for index in np.nonzero(per_slice[plugin_number])[0]]
        covered = source.references(present)
        images, series = None, None
        if len(covered) == 1:  # one image: a multi-frame instance, or a single slice
            ((ds, frames),) = covered
            pictured[str(ds.SOPInstanceUID)] = ds
            images = [
                hd.sr.SourceImageForSegmentation.from_source_image(
                    ds, referenced_frame_numbers=frames
                )
            ]
        else:
            series = hd.sr.SourceSeriesForSegmentation(str(covered[0][0].SeriesInstanceUID))
        measurements, evaluations = _about(findings, spec, identity, segment=plugin_number)
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=identity.uid(f"segment-{plugin_number}"), identifier=segment.label
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=numbering[plugin_number],
                    source_images=images,
                    source_series=series,
                ),
                finding_type=coded(segment.type),
                finding_sites=[_finding_site(segment)],
                algorithm_id=_algorithm_id(spec, identity),
                measurements=measurements or None,
                qualitative_evaluations=evaluations or None,
            )
        )
    return groups


def _outline_groups(
    source: SourceSlices,
    findings: Findings,
    spec: PluginSpec,
    identity: ResultIdentity,
    *,
    per_slice: Mapping[int, npt.NDArray[np.int64]],
    pictured: dict[str, Dataset],
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """Each segment's outline on the slice where it is largest (TID 1410, a SCOORD
    polygon on that source image), for viewers that draw no SEG."""
    if findings.label_map is None:
        return []
    groups = []
    for plugin_number in sorted(seg_segment_numbers(findings)):
        segment = spec.segment(plugin_number)
        shape = outline(findings.label_map, plugin_number, per_slice[plugin_number])
        if shape is None:
            continue
        ((ds, frames),) = source.references([shape.slice_index])
        pictured[str(ds.SOPInstanceUID)] = ds
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,  # closed: a polygon
            graphic_data=shape.points,
            source_image=hd.sr.SourceImageForRegion.from_source_image(
                ds, referenced_frame_numbers=frames
            ),
        )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=identity.uid(f"segment-{plugin_number}-outline"),
                    identifier=f"{segment.label}, largest slice",
                ),
                referenced_region=region,
                finding_type=coded(segment.type),
                finding_sites=[_finding_site(segment)],
                algorithm_id=_algorithm_id(spec, identity),
            )
        )
    return groups


def _unsegmented_group(
    findings: Findings,
    spec: PluginSpec,
    identity: ResultIdentity,
    image_index: int | None,
    shown: Sequence[tuple[Dataset, list[int] | None]],
) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    """The findings about one image (``image_index``) or, when it is None, about the
    whole series; None when there are none."""
    measurements, evaluations = _about(findings, spec, identity, segment=None, image=image_index)
    if not evaluations and not measurements:
        return None
    if image_index is None:
        uid, label, sources = identity.uid("series-findings"), f"{spec.name} findings", None
    else:
        uid = identity.uid(f"image-{image_index}-findings")
        label = f"{spec.name} findings, image {image_index + 1}"
        sources = [
            hd.sr.SourceImageForMeasurementGroup.from_source_image(
                ds, referenced_frame_numbers=frames
            )
            for ds, frames in shown
        ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=label),
        algorithm_id=_algorithm_id(spec, identity),
        measurements=measurements or None,
        qualitative_evaluations=evaluations or None,
        source_images=sources,
    )


def build_report(
    source: SourceSlices,
    seg: Dataset | None,
    findings: Findings,
    spec: PluginSpec,
    identity: ResultIdentity,
    *,
    images: Mapping[int, Sequence[int]] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for one job; ``seg`` is the job's SEG when it produced one; ``images``
    gives, for each image a finding is about, the acquired slices it shows."""
    device = identity.device
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = []
    # The images the content references one by one, for the Image Library.
    pictured: dict[str, Dataset] = {}
    try:
        if seg is not None and findings.label_map is not None:
            # Each segment's pixels in each slice, counted once for both kinds of group.
            per_slice = pixels_per_slice(findings.label_map, sorted(seg_segment_numbers(findings)))
            about = (source, findings, spec, identity)
            groups.extend(_segment_groups(seg, *about, per_slice=per_slice, pictured=pictured))
            groups.extend(_outline_groups(*about, per_slice=per_slice, pictured=pictured))
        for image_index, slices in sorted((images or {}).items()):
            shown = source.references(slices)
            pictured.update((str(ds.SOPInstanceUID), ds) for ds, _ in shown)
            group = _unsegmented_group(findings, spec, identity, image_index, shown)
            if group is not None:
                groups.append(group)
        series_group = _unsegmented_group(findings, spec, identity, None, ())
        if series_group is not None:
            groups.append(series_group)
        if not groups:
            raise ResultEncodingError(f"plugin {spec.name} reported nothing to put in an SR")
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=identity.device_uid(spec),
                name=f"{device.manufacturer_model_name} {spec.name} {spec.version}"[:64],
                manufacturer_name=device.manufacturer,
                model_name=device.manufacturer_model_name,
                serial_number=device.device_serial_number,
            ),
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=coded(spec.procedure),
            imaging_measurements=groups,
            referenced_images=library_images(list(pictured.values())) or None,
        )
        evidence = [*source.instances, seg] if seg is not None else source.instances
        earlier = identity.predecessor_sr(str(source.instances[0].StudyInstanceUID))
        report_object = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=identity.uid("sr-series"),
            series_number=identity.sr_series_number,
            sop_instance_uid=identity.uid("sr-instance"),
            instance_number=1,
            manufacturer=device.manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            institution_name=device.institution_name,
            series_description=spec.series_description("SR"),
            contributing_equipment=[contributing_equipment(device, spec)],
            previous_versions=None if earlier is None else [earlier],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultEncodingError(f"SR for plugin {spec.name} cannot be built: {exc}") from exc
    # General Equipment as complete as the SEG's (highdicom's SR takes the
    # manufacturer alone; these are the module's own attributes, PS3.3 C.7.5.1).
    report_object.ManufacturerModelName = device.manufacturer_model_name
    report_object.DeviceSerialNumber = device.device_serial_number
    report_object.SoftwareVersions = device.software_versions
    _identify_private_schemes(report_object, findings)
    return report_object


def _identify_private_schemes(report: Dataset, findings: Findings) -> None:
    """Name each private coding scheme (designator 99...) the findings use in the
    Coding Scheme Identification Sequence, so a reader can tell whose codes they are."""
    codes = [c for e in findings.evaluations for c in (e.name, e.value)]
    codes += [c for m in findings.measurements for c in (m.name, m.unit)]
    private = sorted({c.scheme for c in codes if c.scheme.startswith("99")})
    if not private:
        return
    identifications = []
    for scheme in private:
        item = Dataset()
        item.CodingSchemeDesignator = scheme
        item.CodingSchemeName = f"{scheme} (private codes of Infergate plugins)"[:64]
        item.CodingSchemeResponsibleOrganization = "Infergate"
        identifications.append(item)
    report.CodingSchemeIdentificationSequence = identifications
