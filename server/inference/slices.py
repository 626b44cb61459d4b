"""Reading spooled instances into slices, with their geometry and modality values.

A single-frame image is one slice. A multi-frame image with functional groups
(Enhanced CT and MR, Legacy Converted Enhanced) is one slice per frame: each frame's
position, orientation, pixel spacing and rescale come from its Per-frame Functional
Groups, else from the Shared ones (PS3.3 C.7.6.16). Frames keep their frame number,
so results can refer to them. A projection image (CR, DX) has no place in a volume:
its values are turned to "as displayed" (``projection``).

Headers and pixels are read apart: :func:`read_slices` parses each instance once,
leaving its pixel data unread (pydicom defers it), so the volume can be laid out
from the headers alone; :func:`modality_values` then decodes the slices one at a
time, in the order the volume wants them, each into a float32 array of one slice.
No more than one instance's pixel data is held at once.

Pixel data that lies in the file as the stored values themselves (uncompressed
little-endian, 16 bits allocated, one sample: nearly every CT and MR) is read
straight from the file into its array, with the unused high bits corrected as
pydicom corrects them (PS3.5 8.1.1); anything else goes through pydicom's decoders.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from infergate.dicom.geometry import is_projection
from infergate.errors import VolumeError
from infergate.inference.projection import displayed

# Values larger than this are left in the file until asked for: the pixel data.
_DEFER_BYTES = 64 * 1024

# Transfer syntaxes whose pixel data is the stored values as they are, little-endian.
_NATIVE_LITTLE_ENDIAN = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_INT16 = np.iinfo(np.int16)


@dataclass
class Slice:
    path: Path
    # Pixel data unread until decoded, then dropped; shared by the frames of one instance.
    header: Dataset
    # Zero for a projection image, which has no place in a volume.
    orientation: npt.NDArray[np.float64]
    position: npt.NDArray[np.float64]
    projection: bool
    shape: tuple[int, int]  # rows, columns
    # The modality LUT of this slice (a frame's own in a multi-frame instance).
    slope: float = 1.0
    intercept: float = 0.0
    frame: int | None = None  # 1-based, in a multi-frame instance
    pixel_spacing: tuple[float, float] | None = None  # from a frame's functional groups


def vector(ds: Dataset, keyword: str, length: int, where: str) -> npt.NDArray[np.float64]:
    value = ds.get(keyword)
    if value is None or len(value) != length:
        raise VolumeError(f"{where} has no usable {keyword}")
    return np.array([float(v) for v in value], dtype=np.float64)


def _rescale(source: Dataset) -> tuple[float, float]:
    return (
        float(source.get("RescaleSlope", 1) or 1),
        float(source.get("RescaleIntercept", 0) or 0),
    )


def read_slices(path: Path) -> list[Slice]:
    """The slices in the instance at ``path``: one, or one per frame; their pixel data
    is read by :func:`modality_values`."""
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise VolumeError(f"instance {path.name} cannot be read: {exc}") from exc
    if "PixelData" not in ds:
        raise VolumeError(f"instance {path.name} has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds
    if frames > 1 and not enhanced:
        raise VolumeError(
            f"instance {path.name} has {frames} frames but no per-frame functional groups"
            " (only Enhanced multi-frame images are read)"
        )
    projection = is_projection(ds)
    if projection and frames > 1:
        raise VolumeError(f"instance {path.name} is a multi-frame projection image")
    shape = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    if enhanced:
        return _frames(path, ds, frames, shape)
    if projection:
        orientation, position = np.zeros(6), np.zeros(3)
    else:
        where = f"instance {path.name}"
        orientation = vector(ds, "ImageOrientationPatient", 6, where)
        position = vector(ds, "ImagePositionPatient", 3, where)
    slope, intercept = _rescale(ds)
    return [Slice(path, ds, orientation, position, projection, shape, slope, intercept)]


@overload
def modality_values(
    slices: Sequence[Slice], *, integer: Literal[False] = False
) -> Iterator[npt.NDArray[np.float32]]: ...
@overload
def modality_values(
    slices: Sequence[Slice], *, integer: Literal[True]
) -> Iterator[npt.NDArray[np.float32] | npt.NDArray[np.int16] | npt.NDArray[np.int32]]: ...
def modality_values(
    slices: Sequence[Slice], *, integer: bool = False
) -> Iterator[npt.NDArray[np.float32] | npt.NDArray[np.int16] | npt.NDArray[np.int32]]:
    """The values of each of ``slices`` after the modality LUT (as displayed, for a
    projection image), in their order, one float32 array at a time. An instance's pixel
    data is read when its first slice comes and dropped after its last.

    ``integer``: a slice whose LUT is a whole-number shift (slope 1, the usual CT) comes
    as whole numbers instead, exact and several times quicker to make than float32 (for
    an integer volume, which would round the floats again): int16 when the slice's
    values and the shift keep it in int16's range, else int32."""
    last_use = {id(s.header): i for i, s in enumerate(slices)}
    for index, item in enumerate(slices):
        ds = item.header
        stored = _stored(item)
        if stored.shape[-2:] != item.shape:
            raise VolumeError(
                f"instance {item.path.name}: pixel data is {stored.shape[-2:]},"
                f" the header says {item.shape}"
            )
        if integer and item.slope == 1.0 and item.intercept.is_integer() and not item.projection:
            _drop_pixels(ds, last_use[id(ds)] == index)
            yield _shifted(stored, int(item.intercept))
            continue
        values = stored.astype(np.float32)
        if item.slope != 1.0:
            values *= item.slope
        if item.intercept != 0.0:
            values += item.intercept
        if item.projection:
            values = displayed(values, ds)
        _drop_pixels(ds, last_use[id(ds)] == index)
        yield values


def _stored(item: Slice) -> npt.NDArray[Any]:
    """The stored values of ``item``'s pixels: read from the file where they lie there
    as they are, else decoded by pydicom."""
    native = native_stored(item)
    if native is not None:
        return native
    try:
        return pixel_array(item.header, index=None if item.frame is None else item.frame - 1)
    except Exception as exc:  # pixel handlers raise many types
        raise VolumeError(
            f"instance {item.path.name}: pixel data cannot be decoded: {exc}"
        ) from exc


def native_stored(item: Slice) -> npt.NDArray[np.uint16] | npt.NDArray[np.int16] | None:
    """``item``'s stored values as they lie in its file (still there, unread, or read
    into memory), when the pixel data is uncompressed little-endian, one 16-bit sample
    a pixel; None for pydicom to decode (and to say precisely what is wrong, if
    anything is).

    The bits above Bits Stored are not part of the value (PS3.5 8.1.1): shifted out
    and back, which sign-extends a signed value, as pydicom does."""
    ds = item.header
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in _NATIVE_LITTLE_ENDIAN:
        return None
    if ds.get("BitsAllocated") != 16 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    stored = _native_words(
        item, np.dtype("<i2") if ds.get("PixelRepresentation") == 1 else np.dtype("<u2")
    )
    if stored is None:
        return None
    bits = int(ds.get("BitsStored", 16) or 16)
    if 0 < bits < 16:
        np.left_shift(stored, 16 - bits, out=stored)
        np.right_shift(stored, 16 - bits, out=stored)
    return stored.reshape(item.shape)


def _native_words(item: Slice, dtype: np.dtype[Any]) -> npt.NDArray[Any] | None:
    """The 16-bit words of ``item``'s frame, a writeable copy: from the bytes read
    already or from the file where pydicom left them; None where there are fewer than
    the header says."""
    element = item.header.get_item("PixelData", keep_deferred=True)
    count = item.shape[0] * item.shape[1]
    offset = (0 if item.frame is None else item.frame - 1) * count * 2
    end = offset + count * 2
    if element is None or count == 0:
        return None
    if isinstance(element.value, bytes):
        if len(element.value) < end:
            return None
        return np.frombuffer(element.value, dtype=dtype, count=count, offset=offset).copy()
    if not isinstance(element, RawDataElement) or element.value is not None or element.length < end:
        return None
    try:  # deferred: value_tell is where the value starts in the file
        stored = np.fromfile(
            item.path, dtype=dtype, count=count, offset=element.value_tell + offset
        )
    except OSError as exc:
        raise VolumeError(f"instance {item.path.name}: pixel data cannot be read: {exc}") from exc
    return stored if stored.size == count else None


def _shifted(
    stored: npt.NDArray[Any], intercept: int
) -> npt.NDArray[np.int16] | npt.NDArray[np.int32]:
    """``stored`` + ``intercept``, exactly: in int16 when every result and the shift
    fit it (the sum wraps through int16 and lands where it should), else int32."""
    if (
        np.issubdtype(stored.dtype, np.integer)
        and stored.dtype.itemsize <= 4
        and _INT16.min <= intercept <= _INT16.max
        and _INT16.min <= int(stored.min()) + intercept
        and int(stored.max()) + intercept <= _INT16.max
    ):
        whole16 = stored.astype(np.int16, copy=not stored.flags.writeable)
        if intercept != 0:
            whole16 += np.int16(intercept)
        return whole16
    whole32 = stored.astype(np.int32)
    if intercept != 0:
        whole32 += intercept
    return whole32


def _drop_pixels(ds: Dataset, last: bool) -> None:
    """An instance's pixel data let go once its last slice is decoded."""
    if last and "PixelData" in ds:
        del ds.PixelData


def _frames(path: Path, ds: Dataset, count: int, shape: tuple[int, int]) -> list[Slice]:
    """One slice per frame of an Enhanced multi-frame instance."""
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != count:
        raise VolumeError(
            f"instance {path.name} has {count} frames but {len(per_frame)} per-frame"
            " functional groups"
        )
    shared = (
        ds.SharedFunctionalGroupsSequence[0]
        if ds.get("SharedFunctionalGroupsSequence")
        else Dataset()
    )

    def group(item: Dataset, keyword: str) -> Dataset | None:
        for source in (item, shared):
            if source.get(keyword):
                found: Dataset = source[keyword].value[0]
                return found
        return None

    slices = []
    for index, item in enumerate(per_frame):
        where = f"instance {path.name} frame {index + 1}"
        plane_orientation = group(item, "PlaneOrientationSequence")
        plane_position = group(item, "PlanePositionSequence")
        if plane_orientation is None or plane_position is None:
            raise VolumeError(f"{where} has no Plane Orientation or Plane Position")
        measures = group(item, "PixelMeasuresSequence")
        if measures is None:
            raise VolumeError(f"{where} has no Pixel Measures")
        spacing = vector(measures, "PixelSpacing", 2, where)
        slope, intercept = _rescale(group(item, "PixelValueTransformationSequence") or Dataset())
        slices.append(
            Slice(
                path,
                ds,
                vector(plane_orientation, "ImageOrientationPatient", 6, where),
                vector(plane_position, "ImagePositionPatient", 3, where),
                projection=False,
                shape=shape,
                slope=slope,
                intercept=intercept,
                frame=index + 1,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
            )
        )
    return slices
