"""The ct_lung_unet plugin: its volume padded for the network and the labels cut back,
judged as ct_lung's; opt-in; and, with onnxruntime running the committed network
outside Triton, the lungs of a phantom whose size is not the network's multiple."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt
import pytest
import structlog

from infergate.config import Settings
from infergate.inference.volume import load_series
from infergate.plugin_api import Series
from infergate.plugins import LoadedPlugin, discover, enabled_plugins
from infergate.testing import check_plugin, synthetic_series, write_chest_ct
from infergate_plugins.ct_lung import plugin as ct_lung
from infergate_plugins.ct_lung_unet import plugin
from infergate_plugins.ct_lung_unet.plugin import MULTIPLE, PAD_HU, CtLungUnetPlugin

REPO = Path(__file__).resolve().parents[2]


def _series(shape: tuple[int, int, int]) -> Series:
    volume = np.full(shape, -1000, dtype=np.int16)
    volume[:, :, : shape[2] - 3] = 40
    volume.flags.writeable = False
    return Series(
        modality="CT",
        volume=volume,
        spacing=(10.0, 5.0, 6.0),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        origin=(0.0, 0.0, 0.0),
    )


def test_a_volume_of_the_networks_multiple_goes_as_it_is() -> None:
    series = _series((4, 32, 48))
    hu = plugin.preprocess(series)["CT_HU"]
    assert hu is series.volume  # no copy: from where it lies (shared memory)


def test_other_sizes_are_padded_with_air_and_the_labels_cut_back() -> None:
    series = _series((10, 40, 45))
    hu = plugin.preprocess(series)["CT_HU"]
    assert hu.shape == (10, 48, 48)
    assert hu.shape[1] % MULTIPLE == hu.shape[2] % MULTIPLE == 0
    assert np.array_equal(hu[:, :40, :45], series.volume)
    assert (hu[:, 40:, :] == PAD_HU).all()
    assert (hu[:, :, 45:] == PAD_HU).all()
    # The same candidates as ct_lung's model gives, as the network's padded answer.
    labels = np.zeros((10, 40, 45), dtype=np.uint8)
    labels[:, :, :15] = 1
    labels[:, :30, 28:] = 2
    padded = np.zeros((10, 48, 48), dtype=np.uint8)
    padded[:, :40, :45] = labels
    padded[:, 44:, :] = 1  # what the network says of the padding is dropped
    found = plugin.postprocess(series, {"LUNG_LABELS": padded})
    expected = ct_lung.postprocess(series, {"LUNG_LABELS": labels})
    assert found.label_map is not None
    assert expected.label_map is not None
    assert np.array_equal(found.label_map, expected.label_map)
    assert found.measurements == expected.measurements
    with pytest.raises(ValueError, match=r"expected \(10, 48, 48\)"):
        plugin.postprocess(series, {"LUNG_LABELS": labels})


def test_it_conforms_at_a_size_it_must_pad() -> None:
    assert check_plugin(plugin) == []
    odd = synthetic_series("CT", shape=(6, 36, 70), volume_type="int16")
    assert plugin.preprocess(odd)["CT_HU"].shape == (6, 48, 80)


def test_it_runs_only_where_plugins_enabled_lists_it() -> None:
    installed = discover()
    assert plugin.spec.opt_in
    with structlog.testing.capture_logs() as logs:
        default = [p.spec.name for p in enabled_plugins(Settings(), installed)]
    assert "ct_lung_unet" not in default
    assert "ct_lung" in default
    assert {"event": "plugins.skipped", "plugin": "ct_lung_unet"}.items() <= logs[0].items()
    listed = Settings.model_validate({"plugins": {"enabled": ["ct_lung_unet"]}})
    assert [p.spec.name for p in enabled_plugins(listed, installed)] == ["ct_lung_unet"]
    # A plugin that is not opt-in runs by default, as before.
    other = LoadedPlugin(_NotOptIn(), "test")
    assert enabled_plugins(Settings(), [other]) == [other]


class _NotOptIn(CtLungUnetPlugin):
    spec = replace(CtLungUnetPlugin.spec, opt_in=False)


def _dice(found: npt.NDArray[np.uint8], truth: npt.NDArray[np.uint8], label: int) -> float:
    a, b = found == label, truth == label
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


def test_the_network_finds_the_lungs_of_a_phantom_it_must_pad(
    unet_model: ModuleType, tmp_path: Path
) -> None:
    # 500 x 500 pixels: padded to 512 for the network, cut back for the results.
    phantom = write_chest_ct(tmp_path, slices=24, size=500, slice_spacing=10.0)
    loaded = load_series(list(phantom.paths), volume_type="int16")
    series = loaded.series
    hu = plugin.preprocess(series)["CT_HU"]
    session = unet_model.session(
        REPO / "model_repository" / "ct_lung_unet" / "1" / "model.onnx", threads=2
    )
    labels = unet_model.labels_of(session, np.ascontiguousarray(hu))
    findings = plugin.postprocess(series, {"LUNG_LABELS": labels})
    assert findings.label_map is not None
    # The truth in the volume's order (slices along the normal: the z of each).
    order = np.argsort(phantom.z_positions)
    truth = np.stack([phantom.truth(int(i)) for i in order])
    assert findings.label_map.shape == truth.shape
    assert _dice(findings.label_map, truth, 1) > 0.98
    assert _dice(findings.label_map, truth, 2) > 0.98
