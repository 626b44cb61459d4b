"""Plugins that fail: ``raises`` on the ct_lung_seg model, whose postprocess raises as
a plugin's own bug would, and ``hangs`` / ``hangs_too`` on the ``hangs`` model, which
never answers. Each runs only on series sent to its own called AE title."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from infergate.plugin_api import Findings, PluginSpec, Series, TensorSpec

_CT_HU = TensorSpec("CT_HU", "INT16", (-1, -1, -1))


def _hounsfield(series: Series) -> npt.NDArray[np.int16]:
    return np.clip(np.rint(series.volume), -32768, 32767).astype(np.int16)


class Raises:
    spec = PluginSpec(
        name="raises",
        version="0.1.0",
        description="Segments the lungs, then fails in its own code",
        modalities=frozenset({"CT"}),
        model_name="ct_lung_seg",
        rule={"modality": ["CT"], "called_ae": ["RAISES"]},
        inputs=(_CT_HU, TensorSpec("SPACING_MM", "FP32", (3,))),
        outputs=(TensorSpec("LUNG_LABELS", "UINT8", (-1, -1, -1)),),
    )

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]:
        spacing = np.asarray(series.spacing, dtype=np.float32)
        return {"CT_HU": _hounsfield(series), "SPACING_MM": spacing}

    def postprocess(
        self, series: Series, outputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Findings:
        raise RuntimeError("a bug in the plugin's own postprocess")


class Hangs:
    def __init__(self, name: str, called_ae: str) -> None:
        self.spec = PluginSpec(
            name=name,
            version="0.1.0",
            description="Calls a model that never answers",
            modalities=frozenset({"CT"}),
            model_name="hangs",
            rule={"modality": ["CT"], "called_ae": [called_ae]},
            inputs=(_CT_HU,),
            outputs=(TensorSpec("LABELS", "UINT8", (-1, -1, -1)),),
        )

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]:
        return {"CT_HU": _hounsfield(series)}

    def postprocess(
        self, series: Series, outputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Findings:
        return Findings()


raises = Raises()
hangs = Hangs("hangs", "HANGS")
hangs_too = Hangs("hangs_too", "HANGS_TOO")
