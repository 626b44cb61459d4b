"""Multi-frame test series: a single-frame CT series converted into one multi-frame
instance with per-frame functional groups, by highdicom's legacy converter (Legacy
Converted Enhanced CT Image, the same functional groups as Enhanced CT).

The frames are put in a shuffled order, so a reader that takes frame order for
spatial order gets the volume wrong.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import generate_uid


def write_multiframe_ct(
    paths: list[Path], target: Path, *, seed: int = 5, series_number: int = 30
) -> Path:
    """Convert the single-frame CT slices at ``paths`` into one multi-frame instance at
    ``target`` (in the same study, a new series), frames in shuffled order."""
    converted = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=[pydicom.dcmread(p) for p in paths],
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    # The converter sorts the frames along the normal; undo that, keeping each frame's
    # functional groups with its pixels.
    frames = converted.pixel_array.reshape(
        int(converted.NumberOfFrames), *converted.pixel_array.shape[-2:]
    )
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(frames))]
    per_frame = list(converted.PerFrameFunctionalGroupsSequence)
    converted.PerFrameFunctionalGroupsSequence = [per_frame[i] for i in order]
    converted.PixelData = np.ascontiguousarray(frames[order]).tobytes()
    if "DimensionOrganizationType" in converted:
        del converted.DimensionOrganizationType  # frames no longer in stack order
    target.parent.mkdir(parents=True, exist_ok=True)
    converted.save_as(target, enforce_file_format=True)
    return target
