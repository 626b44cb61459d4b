"""For a PACS that cannot store Segmentation: the SEG's segments drawn on the source
slices as Secondary Capture images (highdicom's SC), in the same study.

Each source slice (or frame) that a segment covers becomes one RGB image: the slice
as the radiologist sees it (its modality LUT and first VOI window; without a window,
its 1st to 99th percentile), each segment tinted in its colour with its outline drawn
solid, and a legend burned in at the top left (each segment's colour and label, and
that the image is an algorithm's result; "not for clinical use" when the SEG says
so). Burned In Annotation says YES. UIDs are derived from the SEG's, so the same SEG
always gives the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import generate_uid
from scipy import ndimage

from infergate.dicom.geometry import frame_attribute
from infergate.errors import ResultEncodingError

# Colours by segment number (1-based), distinct on grey and for the common colour
# vision deficiencies (Okabe and Ito's palette).
PALETTE = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
)
TINT = 0.45  # how much of a segment's colour covers the slice inside it
LEGEND_ORIGIN = (4, 4)
# A SC series' number: the SEG's plus this (the SEG's + 1 is the SR's).
SERIES_OFFSET = 3

# (SOP Instance UID, frame number or None) -> that source image's dataset and frame.
SourceLookup = Callable[[str, int | None], tuple[Dataset, int | None] | None]


@dataclass(frozen=True)
class _Drawn:
    """One source image and what the SEG says of it: segment number -> mask."""

    source: Dataset
    frame: int | None
    masks: dict[int, npt.NDArray[np.bool_]]


def _frames(seg: Dataset, lookup: SourceLookup) -> list[_Drawn]:
    """The SEG's frames, gathered by the source image each derives from."""
    pixels = np.asarray(seg.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    drawn: dict[tuple[str, int | None], _Drawn] = {}
    shared = seg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        # A macro the same for every frame may be in the shared functional groups
        # (highdicom puts a single segment's identification there).
        identification = item.get("SegmentIdentificationSequence") or shared.get(
            "SegmentIdentificationSequence"
        )
        derivation = item.get("DerivationImageSequence") or shared.get("DerivationImageSequence")
        number = int(identification[0].ReferencedSegmentNumber)
        derived = derivation[0].SourceImageSequence[0]
        uid = str(derived.ReferencedSOPInstanceUID)
        frame = int(derived.ReferencedFrameNumber) if "ReferencedFrameNumber" in derived else None
        mask = pixels[index] > 0
        if not mask.any():
            continue
        key = (uid, frame)
        if key not in drawn:
            found = lookup(uid, frame)
            if found is None:
                raise ResultEncodingError(f"the SEG's source image {uid} is no longer on disk")
            drawn[key] = _Drawn(found[0], found[1], {})
        masks = drawn[key].masks
        masks[number] = masks.get(number, np.zeros_like(mask)) | mask
    return list(drawn.values())


def _grey(source: Dataset, frame: int | None) -> npt.NDArray[np.uint8]:
    """The source image as displayed, 0-255."""
    pixels = source.pixel_array
    if frame is not None and int(source.get("NumberOfFrames", 1)) > 1:
        pixels = pixels[frame - 1]
    values = np.asarray(apply_modality_lut(pixels, source), dtype=np.float64)
    if source.get("WindowCenter") is not None and source.get("WindowWidth") is not None:
        # The window maps onto the stored range; its ends are the image's ends.
        values = np.asarray(apply_voi_lut(values, source, index=0), dtype=np.float64)
        low, high = float(values.min()), float(values.max())
    else:
        low, high = (float(v) for v in np.percentile(values, (1, 99)))
    if high <= low:
        high = low + 1.0
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0
    if str(source.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 255.0 - scaled
    grey: npt.NDArray[np.uint8] = np.rint(scaled).astype(np.uint8)
    return grey


def _draw(
    grey: npt.NDArray[np.uint8],
    masks: dict[int, npt.NDArray[np.bool_]],
    labels: dict[int, str],
    caveat: str,
) -> npt.NDArray[np.uint8]:
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=2).astype(np.float64)
    for number, mask in sorted(masks.items()):
        colour = np.asarray(PALETTE[(number - 1) % len(PALETTE)], dtype=np.float64)
        rgb[mask] = (1.0 - TINT) * rgb[mask] + TINT * colour
        edge = mask & ~ndimage.binary_erosion(mask)
        rgb[edge] = colour
    image = Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")
    _legend(image, [(PALETTE[(n - 1) % len(PALETTE)], labels[n]) for n in sorted(masks)], caveat)
    drawn: npt.NDArray[np.uint8] = np.asarray(image, dtype=np.uint8)
    return drawn


def legend_box(lines: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Where the legend of ``lines`` lines lies on an image: left, top, right, bottom."""
    left, top = LEGEND_ORIGIN
    return left, top, min(width - 1, left + 260), min(height - 1, top + 6 + 12 * lines)


def _legend(
    image: Image.Image, entries: list[tuple[tuple[int, int, int], str]], caveat: str
) -> None:
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    box = legend_box(len(entries) + 1, *image.size)
    draw.rectangle(box, fill=(0, 0, 0))
    x, y = box[0] + 3, box[1] + 3
    for colour, label in entries:
        draw.rectangle((x, y + 1, x + 8, y + 9), fill=colour)
        draw.text((x + 12, y), label[:36], fill=(255, 255, 255), font=font)
        y += 12
    draw.text((x, y), caveat[:42], fill=(255, 255, 255), font=font)


def _orientation(source: Dataset) -> tuple[str, str] | None:
    iop = frame_attribute(source, "ImageOrientationPatient")
    if iop is None:
        return None
    row, column = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)
    axes = np.column_stack([row, column, np.cross(row, column)])
    first, second, _ = hd.spatial.get_closest_patient_orientation(axes)
    return (first.value, second.value)


def _pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    spacing = frame_attribute(source, "PixelSpacing")
    return None if spacing is None else (float(spacing[0]), float(spacing[1]))


def secondary_captures(seg: Dataset, lookup: SourceLookup, uid_root: str) -> list[Dataset]:
    """The SEG ``seg`` drawn on the source images it derives from (found by
    ``lookup``), one Secondary Capture image each, in slice order of the SEG."""
    images: list[Dataset] = []
    try:
        labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
        description = str(seg.get("SeriesDescription", ""))
        caveat = (
            "AI result, not for clinical use" if "not for clinical" in description else "AI result"
        )
        series_uid = generate_uid(prefix=uid_root, entropy_srcs=[str(seg.SOPInstanceUID), "sc"])
        series_number = int(seg.get("SeriesNumber") or 9001) + SERIES_OFFSET
        for number, drawn in enumerate(_frames(seg, lookup), start=1):
            source = drawn.source
            rgb = _draw(_grey(source, drawn.frame), drawn.masks, labels, caveat)
            uid = generate_uid(
                prefix=uid_root, entropy_srcs=[str(seg.SOPInstanceUID), "sc", str(number)]
            )
            image = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=source,
                pixel_array=rgb,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=uid,
                instance_number=number,
                manufacturer=str(seg.get("Manufacturer", "")),
                pixel_spacing=_pixel_spacing(source),  # type: ignore[arg-type] # mm, floats
                patient_orientation=_orientation(source),
                series_description=_sc_description(description),
            )
            _derived_from(image, source, drawn.frame)
            images.append(image)
    except (
        ValueError,
        TypeError,
        AttributeError,
        KeyError,
        IndexError,
        RuntimeError,  # a source's pixel data no decoder here reads
        NotImplementedError,
    ) as exc:
        # A SEG that is not what we write (a file changed on disk), a source that
        # cannot be decoded: that SEG alone.
        raise ResultEncodingError(
            f"Secondary Capture images cannot be built: {type(exc).__name__}: {exc}"
        ) from exc
    return images


def _sc_description(seg_description: str) -> str:
    """The SEG's description with "SEG" said as what these images are."""
    return seg_description.replace("(AI SEG", "(AI overlay")[:64] or "AI overlay"


def _derived_from(image: Dataset, source: Dataset, frame: int | None) -> None:
    """What the image shows and was made from (General Image, PS3.3 C.7.6.1)."""
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.BurnedInAnnotation = "YES"
    image.DerivationDescription = "Segmentation drawn on the source image"
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    image.SourceImageSequence = [item]
    # What it shows, as the source says (General Series' Laterality is required for a
    # paired body part: a reader judges by these).
    for keyword in ("BodyPartExamined", "Laterality", "ImageLaterality"):
        if source.get(keyword):
            setattr(image, keyword, source[keyword].value)
