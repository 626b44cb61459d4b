"""Cutting a request into chunks of slices and joining the answers."""

from __future__ import annotations

import numpy as np
import pytest

from infergate.errors import InferenceError
from infergate.inference.chunks import join_slices, split_slices


def test_slice_inputs_are_cut_and_the_others_go_whole() -> None:
    volume = np.arange(7 * 2 * 2, dtype=np.int16).reshape(7, 2, 2)
    spacing = np.ones(3, dtype=np.float32)
    weights = np.ones(7, dtype=np.float32)  # one per slice: cut with them
    parts = split_slices({"IMAGE": volume, "SPACING": spacing, "W": weights}, 3)
    assert [p["IMAGE"].shape[0] for p in parts] == [3, 3, 1]
    assert [p["W"].shape[0] for p in parts] == [3, 3, 1]
    assert all(p["SPACING"] is spacing for p in parts)
    joined = join_slices([{"OUT": np.negative(p["IMAGE"])} for p in parts], ("OUT",))
    np.testing.assert_array_equal(joined["OUT"], -volume)


def test_a_request_that_fits_is_one_chunk() -> None:
    volume = np.zeros((4, 8, 8), dtype=np.float32)
    (part,) = split_slices({"IMAGE": volume}, 4)
    assert part["IMAGE"] is volume
    with pytest.raises(InferenceError, match="at least one slice"):
        split_slices({"IMAGE": volume}, 0)


def test_scalar_outputs_cannot_be_joined() -> None:
    with pytest.raises(InferenceError, match="scalar per chunk"):
        join_slices([{"N": np.array(1)}, {"N": np.array(2)}], ("N",))
