"""lung_total: an external plugin that reuses the ct_lung_seg model and reports the
total lung volume of a chest CT as one series-level measurement (an SR, no SEG)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from infergate.plugin_api import (
    MILLILITER,
    VOLUME,
    Findings,
    Measurement,
    PluginSpec,
    Series,
    TensorSpec,
)

SPEC = PluginSpec(
    name="lung_total",
    version="0.1.0",
    description="Total lung volume on chest CT (both lungs together)",
    modalities=frozenset({"CT"}),
    model_name="ct_lung_seg",
    rule={"modality": ["CT"], "body_part": ["CHEST"]},
    inputs=(
        TensorSpec("CT_HU", "INT16", (-1, -1, -1)),
        TensorSpec("SPACING_MM", "FP32", (3,)),
    ),
    outputs=(TensorSpec("LUNG_LABELS", "UINT8", (-1, -1, -1)),),
)


class LungTotal:
    spec = SPEC

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]:
        hu = np.clip(np.rint(series.volume), -32768, 32767).astype(np.int16)
        return {"CT_HU": hu, "SPACING_MM": np.asarray(series.spacing, dtype=np.float32)}

    def postprocess(
        self, series: Series, outputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Findings:
        labels = np.asarray(outputs["LUNG_LABELS"], dtype=np.uint8)
        total_ml = round(float((labels > 0).sum()) * series.voxel_volume_ml, 1)
        return Findings(
            measurements=(Measurement(None, VOLUME, total_ml, MILLILITER),),
            summary={"total_lung_ml": total_ml},
        )


plugin = LungTotal()
