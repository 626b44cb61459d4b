"""The ct_lung_unet plugin: the volume in HU to a trained network, slice by slice;
its two lung candidates judged as ct_lung judges its model's."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from infergate.plugin_api import Findings, PluginSpec, Series, TensorSpec, as_int16
from infergate_plugins.ct_lung.plugin import CHEST_CT_RULE, LUNG_SEGMENTS, lung_findings

# The network halves rows and columns four times: it takes multiples of this.
MULTIPLE = 16
# What the rows and columns added to reach them hold: air, as outside a body.
PAD_HU = -1024
# Slices per request: Triton's dynamic batcher gathers requests (of one job or of
# several) into batches of up to the model's max_batch_size (64), preferring 32 or 64.
SLICE_CHUNK = 32

SPEC = PluginSpec(
    name="ct_lung_unet",
    version="1.0.0",
    description="Left and right lung segmentation on chest CT by a trained 2-D U-Net (ONNX)",
    title="Lung segmentation (U-Net)",
    modalities=frozenset({"CT"}),
    model_name="ct_lung_unet",
    # The network of model_repository/ct_lung_unet/1; a new version is a new network,
    # which this plugin's pre- and postprocess must be checked against first.
    model_version="1",
    rule=CHEST_CT_RULE,
    inputs=(TensorSpec("CT_HU", "INT16", (-1, -1, -1)),),
    volume_type="int16",
    outputs=(TensorSpec("LUNG_LABELS", "UINT8", (-1, -1, -1), shape_of="CT_HU"),),
    segments=LUNG_SEGMENTS,
    slice_chunk=SLICE_CHUNK,
    # The same task as ct_lung on the same series: it runs where plugins.enabled says.
    opt_in=True,
)


class CtLungUnetPlugin:
    """See the README beside this file for intended use, training and limits."""

    spec = SPEC

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]:
        hu = as_int16(series.volume)
        rows, columns = hu.shape[1:]
        pad_rows, pad_columns = -rows % MULTIPLE, -columns % MULTIPLE
        if pad_rows or pad_columns:
            # Only then a copy: a 512 x 512 volume goes as it is, from where it lies.
            hu = np.pad(hu, ((0, 0), (0, pad_rows), (0, pad_columns)), constant_values=PAD_HU)
        return {"CT_HU": hu}

    def postprocess(
        self, series: Series, outputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Findings:
        labels = np.asarray(outputs["LUNG_LABELS"], dtype=np.uint8)
        slices, rows, columns = series.volume.shape
        expected = (slices, rows + -rows % MULTIPLE, columns + -columns % MULTIPLE)
        if labels.shape != expected:
            raise ValueError(f"LUNG_LABELS has shape {labels.shape}, expected {expected}")
        return lung_findings(series, labels[:, :rows, :columns])
