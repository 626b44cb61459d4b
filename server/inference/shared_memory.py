"""Inputs handed to a Triton on the same host through system shared memory.

A volume sent inside a gRPC message is serialised, copied through the socket and
parsed again; through shared memory Triton reads it where Infergate wrote it (about
ten times faster for a 300-slice volume on this machine kind, PERFORMANCE.md).

A job's volume is built in a region of its own from the start (:class:`JobMemory`),
so it is neither copied into shared memory nor held twice: the request names the
region and where in it the tensor lies. Other inputs (a few numbers) are copied into
a small region per request. Each region is registered with Triton for the request
and removed after it, so no two jobs share memory and nothing is left registered.
A region's room is reserved when it is made (``posix_fallocate``): a /dev/shm too
small for it (a container's 64 MB default) is an error then, not a SIGBUS while the
volume is written; the job's arrays are then in its own memory, and its inputs go
inside the gRPC message. Regions are named after the process
(``infergate_<pid>_<n>``); those of a process that died without removing them are
removed when the next client starts.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from infergate.errors import SharedMemoryUnavailableError, TritonUnavailableError
from infergate.logs import get_logger
from infergate.plugin_api import VolumeArray

log = get_logger(__name__)

PREFIX = "infergate_"
_SHM_DIR = Path("/dev/shm")  # noqa: S108 - where POSIX shared memory lives, not a temp file
# Each tensor starts on a cache line of its own.
_ALIGN = 64
_counter = itertools.count(1)
_UNREGISTER_TRIES = 40  # 2 s at most


def _aligned(size: int) -> int:
    return (size + _ALIGN - 1) // _ALIGN * _ALIGN


class Region:
    """A POSIX shared memory region of ``size`` bytes, mapped into this process, its
    room reserved. :meth:`close` removes it; its memory is freed once no array of it
    is left."""

    def __init__(self, size: int, directory: Path = _SHM_DIR) -> None:
        self.name = f"{PREFIX}{os.getpid()}_{next(_counter)}"
        self.size = max(_aligned(size), _ALIGN)
        self._path = directory / self.name
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise SharedMemoryUnavailableError(f"cannot create {self._path}: {exc}") from exc
        try:
            os.posix_fallocate(fd, 0, self.size)
            self._map = mmap.mmap(fd, self.size)
        except OSError as exc:
            self._path.unlink(missing_ok=True)
            raise SharedMemoryUnavailableError(
                f"no room for {self.size} bytes in {directory}: {exc.strerror}"
            ) from exc
        finally:
            os.close(fd)
        self._bytes: npt.NDArray[np.uint8] | None = np.frombuffer(self._map, dtype=np.uint8)
        self._address = int(self._bytes.ctypes.data)

    @property
    def key(self) -> str:
        """The key Triton opens it by."""
        return f"/{self.name}"

    def array(
        self, shape: tuple[int, ...], dtype: np.dtype[np.generic], offset: int = 0
    ) -> npt.NDArray[np.generic]:
        if self._bytes is None:
            raise SharedMemoryUnavailableError(f"region {self.name} is closed")
        count = int(np.prod(shape)) * dtype.itemsize
        return self._bytes[offset : offset + count].view(dtype).reshape(shape)

    def offset_of(self, array: npt.NDArray[np.generic]) -> int | None:
        """Where in this region ``array`` lies, whole and contiguous; None if it does not."""
        if self._bytes is None or not array.flags.c_contiguous:
            return None
        start = int(array.ctypes.data) - self._address
        if start >= 0 and start + array.nbytes <= self.size:
            return start
        return None

    def close(self) -> None:
        self._path.unlink(missing_ok=True)
        self._bytes = None
        # An array of it still held keeps the memory until that array goes.
        with contextlib.suppress(BufferError):
            self._map.close()


class JobMemory:
    """Where a job's large arrays are made: in shared memory regions a Triton on this
    host reads in place (``shared``), else in the process's own memory."""

    def __init__(self, shared: bool) -> None:
        self.shared = shared
        self._regions: list[Region] = []

    def empty(
        self, shape: tuple[int, ...], dtype: np.dtype[np.float32] | np.dtype[np.int16]
    ) -> VolumeArray:
        """An uninitialised array, like ``numpy.empty``."""
        if self.shared:
            try:
                region = self.region(int(np.prod(shape)) * dtype.itemsize)
            except SharedMemoryUnavailableError as exc:
                log.warning("inference.shared_memory.unavailable", reason=str(exc))
                self.shared = False
            else:
                return cast("VolumeArray", region.array(shape, dtype))
        return cast("VolumeArray", np.empty(shape, dtype=dtype))

    def region(self, size: int) -> Region:
        """A region of ``size`` bytes that lives as long as the job's memory; raises
        :class:`SharedMemoryUnavailableError`."""
        region = Region(size)
        self._regions.append(region)
        return region

    def find(self, array: npt.NDArray[np.generic]) -> tuple[Region, int] | None:
        """The region ``array`` lies in, and where."""
        for region in self._regions:
            offset = region.offset_of(array)
            if offset is not None:
                return region, offset
        return None

    def close(self) -> None:
        for region in self._regions:
            region.close()
        self._regions.clear()


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


@dataclass(frozen=True)
class SharedTensor:
    """A tensor in a registered region: where it lies, and what it is."""

    name: str
    region: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype[np.generic]

    def _span(self, start: int, count: int | None) -> tuple[list[int], int, int]:
        """The shape, offset and bytes of slices ``start`` to ``start + count`` along
        the first axis (all of it when ``count`` is None)."""
        shape = list(self.shape)
        offset = self.offset
        if count is not None:
            offset += start * int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
            shape[0] = count
        return shape, offset, int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize

    def request_input(self, start: int = 0, count: int | None = None) -> grpcclient.InferInput:
        """The request's input (of those slices only)."""
        shape, offset, size = self._span(start, count)
        tensor = grpcclient.InferInput(self.name, shape, np_to_triton_dtype(self.dtype))
        tensor.set_shared_memory(self.region, size, offset=offset)
        return tensor

    def requested_output(
        self, start: int = 0, count: int | None = None
    ) -> grpcclient.InferRequestedOutput:
        """The request's output, written by Triton there (those slices only)."""
        _, offset, size = self._span(start, count)
        requested = grpcclient.InferRequestedOutput(self.name)
        requested.set_shared_memory(self.region, size, offset=offset)
        return requested


@contextmanager
def shared_memory_inputs(
    client: grpcclient.InferenceServerClient,
    inputs: Mapping[str, npt.NDArray[np.generic]],
    timeout_s: float,
    memory: JobMemory | None = None,
) -> Iterator[list[SharedTensor]]:
    """The request inputs, in regions registered with Triton for as long as the block
    runs: an input that lies in one of ``memory``'s regions where it is, the others
    copied into one region of their own. Raises :class:`SharedMemoryUnavailableError`
    when a region cannot be made or Triton cannot map it."""
    placed: dict[str, tuple[Region, int]] = {}
    copied: dict[str, npt.NDArray[np.generic]] = {}
    for name, array in inputs.items():
        found = memory.find(array) if memory is not None else None
        if found is not None:
            placed[name] = found
        else:
            copied[name] = np.ascontiguousarray(array)
    own: Region | None = None
    registered: list[Region] = []
    try:
        if copied:
            own = Region(sum(_aligned(a.nbytes) for a in copied.values()))
            offset = 0
            for name, array in copied.items():
                own.array(array.shape, array.dtype, offset)[...] = array
                placed[name] = (own, offset)
                offset += _aligned(array.nbytes)
        for region in {id(r): r for r, _ in placed.values()}.values():
            _register(client, region, timeout_s)
            registered.append(region)
        yield [
            SharedTensor(name, placed[name][0].name, placed[name][1], array.shape, array.dtype)
            for name, array in inputs.items()
        ]
    finally:
        for region in registered:
            _unregister(client, region.name, timeout_s)
        if own is not None:
            own.close()


@contextmanager
def shared_memory_outputs(
    client: grpcclient.InferenceServerClient,
    shapes: Mapping[str, tuple[tuple[int, ...], np.dtype[np.generic]]],
    timeout_s: float,
    memory: JobMemory,
) -> Iterator[dict[str, tuple[SharedTensor, Region]]]:
    """For each output of ``shapes`` (its shape and type, known before the model
    runs), a region of the job's memory Triton writes it into, registered for as long
    as the block runs; the output's arrays stay valid as long as ``memory``."""
    placed: dict[str, tuple[SharedTensor, Region]] = {}
    registered: list[Region] = []
    try:
        for name, (shape, dtype) in shapes.items():
            region = memory.region(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            _register(client, region, timeout_s)
            registered.append(region)
            placed[name] = (SharedTensor(name, region.name, 0, shape, dtype), region)
        yield placed
    finally:
        for region in registered:
            _unregister(client, region.name, timeout_s)


def _register(client: grpcclient.InferenceServerClient, region: Region, timeout_s: float) -> None:
    try:
        client.register_system_shared_memory(
            region.name, region.key, region.size, client_timeout=timeout_s
        )
    except InferenceServerException as exc:
        status = exc.status() or ""
        if "UNAVAILABLE" in status or "DEADLINE" in status:
            raise TritonUnavailableError(f"Triton did not answer: {exc.message()}") from exc
        raise SharedMemoryUnavailableError(f"Triton cannot map it: {exc.message()}") from exc


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
