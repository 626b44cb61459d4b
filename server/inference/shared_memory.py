"""Inputs handed to a Triton on the same host through system shared memory.

A volume sent inside a gRPC message is serialised, copied through the socket and
parsed again; through shared memory Triton reads it where Infergate wrote it (about
ten times faster for a 300-slice volume on this machine kind, PERFORMANCE.md). Each
request gets its own region, registered with Triton for the request and removed
after it, so no two jobs share memory and nothing is left registered. Regions are
named after the process (``infergate_<pid>_<n>``); those of a process that died
without removing them are removed when the next client starts.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from infergate.errors import SharedMemoryUnavailableError, TritonUnavailableError
from infergate.logs import get_logger

log = get_logger(__name__)

PREFIX = "infergate_"
_SHM_DIR = Path("/dev/shm")  # noqa: S108 - where POSIX shared memory lives, not a temp file
# Each tensor starts on a cache line of its own.
_ALIGN = 64
_counter = itertools.count(1)
_UNREGISTER_TRIES = 40  # 2 s at most


def _aligned(size: int) -> int:
    return (size + _ALIGN - 1) // _ALIGN * _ALIGN


def remove_stale_regions(directory: Path = _SHM_DIR) -> list[str]:
    """Remove the regions of Infergate processes that no longer run; their names."""
    removed = []
    for path in directory.glob(f"{PREFIX}*"):
        pid_text = path.name[len(PREFIX) :].split("_", 1)[0]
        if not pid_text.isdigit() or Path(f"/proc/{pid_text}").exists():
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:
            continue
    if removed:
        log.info("inference.shared_memory.stale_removed", regions=len(removed))
    return removed


@contextmanager
def shared_memory_inputs(
    client: grpcclient.InferenceServerClient,
    inputs: Mapping[str, npt.NDArray[np.generic]],
    timeout_s: float,
) -> Iterator[list[grpcclient.InferInput]]:
    """The request inputs, their data in one region registered with Triton for as long
    as the block runs. Raises :class:`SharedMemoryUnavailableError` when the region cannot be
    made or Triton cannot map it."""
    arrays = {name: np.ascontiguousarray(array) for name, array in inputs.items()}
    offsets, total = {}, 0
    for name, array in arrays.items():
        offsets[name] = total
        total += _aligned(array.nbytes)
    region = f"{PREFIX}{os.getpid()}_{next(_counter)}"
    try:
        handle = shm.create_shared_memory_region(region, f"/{region}", max(total, _ALIGN))
    except (shm.SharedMemoryException, OSError) as exc:
        raise SharedMemoryUnavailableError(f"cannot create a {total} byte region: {exc}") from exc
    registered = False
    try:
        for name, array in arrays.items():
            if array.nbytes:
                shm.set_shared_memory_region(handle, [array], offset=offsets[name])
        try:
            client.register_system_shared_memory(
                region, f"/{region}", max(total, _ALIGN), client_timeout=timeout_s
            )
        except InferenceServerException as exc:
            status = exc.status() or ""
            if "UNAVAILABLE" in status or "DEADLINE" in status:
                raise TritonUnavailableError(f"Triton did not answer: {exc.message()}") from exc
            raise SharedMemoryUnavailableError(f"Triton cannot map it: {exc.message()}") from exc
        registered = True
        request_inputs = []
        for name, array in arrays.items():
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_shared_memory(region, array.nbytes, offset=offsets[name])
            request_inputs.append(tensor)
        yield request_inputs
    finally:
        if registered:
            _unregister(client, region, timeout_s)
        shm.destroy_shared_memory_region(handle)


def _unregister(client: grpcclient.InferenceServerClient, region: str, timeout_s: float) -> None:
    """Unregister ``region``. Triton releases a request's hold on it a moment after the
    response, and says "currently in use" until then (seen with two jobs at once), so
    that answer is tried again briefly; a Triton that is gone took its registration with
    it."""
    for attempt in range(_UNREGISTER_TRIES):
        try:
            client.unregister_system_shared_memory(region, client_timeout=timeout_s)
        except InferenceServerException as exc:
            if "in use" in (exc.message() or "") and attempt + 1 < _UNREGISTER_TRIES:
                time.sleep(0.05)
                continue
            log.warning("inference.shared_memory.unregister_failed", reason=exc.message())
        return
