"""Splitting a request into chunks of slices, for a model that treats slices alone.

Over plain gRPC one huge tensor is the slowest way to move a volume (it is
serialised, copied and parsed as one message, and a message has a size limit);
many smaller requests in flight at once overlap the copying with the model's work
(PERFORMANCE.md: about 5x faster than one request for a 300-slice volume). Only a
model that computes each slice without the others may be fed that way; its plugin
says so with ``PluginSpec.slice_chunk``.

The slice axis is the first axis of the largest input: every input whose first axis
has that length is cut along it, the others go whole with every chunk. The outputs of
the chunks are joined along their first axis, in order.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from infergate.errors import InferenceError

Arrays = dict[str, npt.NDArray[np.generic]]


def slice_cut(
    inputs: Mapping[str, npt.NDArray[np.generic]], chunk: int
) -> tuple[int, frozenset[str]] | None:
    """The number of slices and the inputs cut along them when ``inputs`` go as chunks
    of at most ``chunk`` slices; None when they go as one request."""
    if chunk < 1:
        raise InferenceError(f"a chunk must hold at least one slice, not {chunk}")
    if not inputs:
        return None
    largest = max(inputs.values(), key=lambda a: a.nbytes)
    if largest.ndim < 2 or largest.shape[0] <= chunk:
        return None
    slices = largest.shape[0]
    cut = frozenset(
        name for name, array in inputs.items() if array.ndim >= 1 and array.shape[0] == slices
    )
    return slices, cut


def split_slices(inputs: Mapping[str, npt.NDArray[np.generic]], chunk: int) -> list[Arrays]:
    """``inputs`` as requests of at most ``chunk`` slices each (one when it fits)."""
    plan = slice_cut(inputs, chunk)
    if plan is None:
        return [dict(inputs)]
    slices, cut = plan
    return [
        {
            name: array[start : start + chunk] if name in cut else array
            for name, array in inputs.items()
        }
        for start in range(0, slices, chunk)
    ]


def join_slices(parts: list[Arrays], names: tuple[str, ...]) -> Arrays:
    """The outputs of the chunks, in order, as the whole request would have given them."""
    if len(parts) == 1:
        return parts[0]
    joined: Arrays = {}
    for name in names:
        pieces = [part[name] for part in parts]
        if any(piece.ndim == 0 for piece in pieces):
            raise InferenceError(f"output '{name}' is a scalar per chunk: slices cannot be joined")
        joined[name] = np.concatenate(pieces, axis=0)
    return joined
