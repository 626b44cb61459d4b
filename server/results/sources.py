"""Which source instance, and which frame of it, each acquired slice of a job is.

Single-frame series have one instance per slice. A multi-frame (Enhanced) series is
one instance whose frames are the slices, in an order of their own: results refer to
it by frame number, and a SEG's frames follow the source's frame order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from infergate.errors import ResultEncodingError


@dataclass(frozen=True)
class SourceSlices:
    """``headers[i]`` is the instance of acquired slice ``i``; ``frames[i]`` its frame
    number there (1-based), None when the instance is single-frame."""

    headers: tuple[Dataset, ...]
    frames: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if len(self.frames) != len(self.headers):
            raise ResultEncodingError(
                f"{len(self.headers)} source slices but {len(self.frames)} frame numbers"
            )

    @property
    def multiframe(self) -> bool:
        return any(frame is not None for frame in self.frames)

    @property
    def instances(self) -> list[Dataset]:
        """Each source instance once, in slice order."""
        seen: dict[str, Dataset] = {}
        for ds in self.headers:
            seen.setdefault(str(ds.SOPInstanceUID), ds)
        return list(seen.values())

    def references(self, slices: Sequence[int]) -> list[tuple[Dataset, list[int] | None]]:
        """The instances that ``slices`` lie in, each with the frame numbers concerned
        (None for a single-frame instance)."""
        grouped: dict[str, tuple[Dataset, list[int]]] = {}
        for index in slices:
            ds, frame = self.headers[index], self.frames[index]
            entry = grouped.setdefault(str(ds.SOPInstanceUID), (ds, []))
            if frame is not None:
                entry[1].append(frame)
        return [(ds, sorted(frames) or None) for ds, frames in grouped.values()]

    def in_source_order(self, label_frames: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """``label_frames`` (one per slice, in slice order) as the frames of the single
        multi-frame source instance, in its frame order; frames that are no slice of the
        volume (left out) are empty."""
        (instance,) = self.instances
        count = int(instance.NumberOfFrames)
        frames = np.zeros((count, *label_frames.shape[1:]), dtype=np.uint8)
        for index, frame in enumerate(self.frames):
            if frame is None:
                raise ResultEncodingError("a single-frame slice in a multi-frame series")
            frames[frame - 1] = label_frames[index]
        return frames
