"""A small typed adapter over tritonclient's gRPC client.

Every tritonclient error becomes an :class:`InferenceError` here; nothing else in
Infergate imports tritonclient (but ``shared_memory``, its helper). Inputs go through
system shared memory when Triton is on this host, else inside the gRPC message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from infergate.config import TritonSettings
from infergate.errors import (
    InferenceError,
    InferenceTimeoutError,
    ModelMismatchError,
    SharedMemoryUnavailableError,
    TritonUnavailableError,
)
from infergate.inference.chunks import join_slices, slice_cut, split_slices
from infergate.inference.shared_memory import (
    JobMemory,
    Region,
    SharedTensor,
    shared_memory_inputs,
    shared_memory_outputs,
)
from infergate.logs import get_logger
from infergate.plugin_api import PluginSpec, TensorSpec

log = get_logger(__name__)

# Large volumes travel in one message; tritonclient's default cap would refuse them.
_MAX_MESSAGE_BYTES = 2**31 - 1


@dataclass(frozen=True)
class ModelTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    inputs: tuple[ModelTensor, ...]
    outputs: tuple[ModelTensor, ...]
    # The most items (slices) one request may carry in its first dimension, which
    # Triton's metadata includes in each tensor's shape; 0: the model does not batch.
    max_batch_size: int = 0


class TritonClient:
    """Readiness, metadata and inference against one Triton server over gRPC."""

    def __init__(
        self, url: str, timeout_s: float, shared_memory: bool = False, max_in_flight: int = 8
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.max_in_flight = max_in_flight
        # Inputs through system shared memory (Triton on this host), until it fails once.
        self.shared_memory = shared_memory
        self._client = grpcclient.InferenceServerClient(
            url=url,
            channel_args=[
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ],
        )

    @classmethod
    def for_settings(cls, settings: TritonSettings) -> TritonClient:
        """A client of the (first) Triton that ``triton.*`` names."""
        return cls.for_endpoint(settings, settings.grpc_url)

    @classmethod
    def for_endpoint(cls, settings: TritonSettings, url: str) -> TritonClient:
        """A client of the Triton endpoint ``url``, with the settings of ``triton.*``."""
        return cls(
            url,
            settings.request_timeout_s,
            shared_memory=settings.shared_memory_with(url),
            max_in_flight=settings.max_requests_in_flight,
        )

    def close(self) -> None:
        self._client.close()

    def job_memory(self) -> JobMemory:
        """Where a job builds its volume: shared memory Triton reads in place when the
        inputs go through shared memory."""
        return JobMemory(shared=self.shared_memory)

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready(client_timeout=2.0))
        except InferenceServerException:
            return False

    def model_ready(self, model: str, version: str = "") -> bool:
        try:
            return bool(self._client.is_model_ready(model, version, client_timeout=2.0))
        except InferenceServerException:
            return False

    def model_metadata(self, model: str, version: str = "") -> ModelMetadata:
        """Metadata of a ready model; :class:`ModelMismatchError` when it is not there."""
        try:
            if not self._client.is_model_ready(model, version, client_timeout=self.timeout_s):
                raise ModelMismatchError(
                    f"Triton at {self.url} has no ready model '{model}'{self._reason(model)}"
                )
            meta = self._client.get_model_metadata(
                model, version, as_json=True, client_timeout=self.timeout_s
            )
            config = self._client.get_model_config(
                model, version, as_json=True, client_timeout=self.timeout_s
            )
        except InferenceServerException as exc:
            raise TritonUnavailableError(
                f"Triton at {self.url} did not answer for model '{model}': {exc.message()}"
            ) from exc

        def tensors(key: str) -> tuple[ModelTensor, ...]:
            return tuple(
                ModelTensor(t["name"], t["datatype"], tuple(int(d) for d in t.get("shape", [])))
                for t in meta.get(key, [])
            )

        return ModelMetadata(
            name=meta["name"],
            versions=tuple(meta.get("versions", [])),
            inputs=tensors("inputs"),
            outputs=tensors("outputs"),
            max_batch_size=int(config.get("config", {}).get("max_batch_size", 0)),
        )

    def _reason(self, model: str) -> str:
        try:
            index = self._client.get_model_repository_index(as_json=True)
        except InferenceServerException:
            return ""
        for entry in index.get("models", []):
            if entry.get("name") == model:
                reason = entry.get("reason") or entry.get("state", "")
                return f" (state {entry.get('state', 'unknown')}: {reason})"
        return " (not in its model repository)"

    def check_plugin(self, spec: PluginSpec) -> ModelMetadata:
        """Check that the model a plugin calls exists and matches its declared tensors."""
        meta = self.model_metadata(spec.model_name, spec.model_version)
        problems = (
            _compare("input", spec.inputs, meta.inputs)
            + _compare("output", spec.outputs, meta.outputs)
            + _batch_problems(spec, meta.max_batch_size)
        )
        if problems:
            raise ModelMismatchError(
                f"plugin {spec.name} {spec.version} does not match Triton model"
                f" '{spec.model_name}': " + "; ".join(problems)
            )
        return meta

    def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.NDArray[np.generic]],
        outputs: tuple[str, ...],
        *,
        version: str = "",
        timeout_s: float | None = None,
        slice_chunk: int | None = None,
        memory: JobMemory | None = None,
        known_outputs: Mapping[str, tuple[tuple[int, ...], np.dtype[np.generic]]] | None = None,
    ) -> Inference:
        """Run the model on ``inputs`` within ``timeout_s`` (default: the client's): its
        outputs, and the version of it that Triton ran.

        Through shared memory, one request; an input made in ``memory`` is read by
        Triton where it lies, and an output of ``known_outputs`` (its shape and type
        known before the model runs) is written by Triton into a region of ``memory``,
        its array valid as long as ``memory`` is. With such outputs and ``slice_chunk``,
        one request per chunk of slices instead, each naming its part of the same
        regions (a model that batches slices takes at most its ``max_batch_size``).
        Over gRPC, one request, or, when ``slice_chunk`` says the model takes slices
        alone, chunks of that many slices with up to ``max_in_flight`` requests at once
        (``chunks``).

        Raises :class:`TritonUnavailableError` when Triton cannot be reached (worth
        retrying), :class:`InferenceTimeoutError` past the deadline, and
        :class:`InferenceError` on any other failure.
        """
        deadline = self.timeout_s if timeout_s is None else timeout_s
        plan = None if slice_chunk is None else slice_cut(inputs, slice_chunk)
        if self.shared_memory:
            try:
                with shared_memory_inputs(self._client, inputs, deadline, memory) as shared:
                    if memory is None or not memory.shared or not known_outputs:
                        return self._infer_shared(
                            model, shared, {}, outputs, version=version, deadline=deadline
                        )
                    shapes = {n: known_outputs[n] for n in outputs if n in known_outputs}
                    with shared_memory_outputs(self._client, shapes, deadline, memory) as placed:
                        return self._infer_shared(
                            model,
                            shared,
                            placed,
                            outputs,
                            version=version,
                            deadline=deadline,
                            slice_chunk=slice_chunk,
                            plan=plan,
                        )
            except SharedMemoryUnavailableError as exc:
                log.warning("inference.shared_memory.unavailable", url=self.url, reason=str(exc))
                self.shared_memory = False
        if slice_chunk is not None and plan is not None:
            parts = split_slices(inputs, slice_chunk)
            names = [grpcclient.InferRequestedOutput(name) for name in outputs]
            answers = self._infer_in_flight(
                model,
                [partial(_grpc_request, part, names) for part in parts],
                outputs,
                deadline,
                version,
            )
            ran = sorted({answer.model_version for answer in answers})
            return Inference(
                join_slices([answer.outputs for answer in answers], outputs), ",".join(ran)
            )
        return self._infer(model, _grpc_inputs(inputs), outputs, version, deadline)

    def _infer_shared(
        self,
        model: str,
        shared: list[SharedTensor],
        placed: Mapping[str, tuple[SharedTensor, Region]],
        outputs: tuple[str, ...],
        *,
        version: str,
        deadline: float,
        slice_chunk: int | None = None,
        plan: tuple[int, frozenset[str]] | None = None,
    ) -> Inference:
        """Inputs in registered regions, outputs of ``placed`` written by Triton into
        theirs: one request, or, when ``plan`` cuts the slices and every placed output
        has them as its first axis, one request per chunk of ``slice_chunk`` slices,
        each naming its byte ranges of the same regions, in flight at once (a model
        with a batch dimension takes no more than its ``max_batch_size`` at once)."""
        regions = {name: region for name, (_, region) in placed.items()}

        def requested(*part: int) -> list[grpcclient.InferRequestedOutput]:
            """The outputs asked for: a placed one as its region (or ``part`` of it,
            start and count of slices), any other in the answer."""
            return [
                placed[name][0].requested_output(*part)
                if name in placed
                else grpcclient.InferRequestedOutput(name)
                for name in outputs
            ]

        if (
            slice_chunk is None
            or plan is None
            or any(tensor.shape[0] != plan[0] for tensor, _ in placed.values())
        ):
            request_inputs = [tensor.request_input() for tensor in shared]
            return self._infer(
                model,
                request_inputs,
                outputs,
                version,
                deadline,
                requested=requested(),
                regions=regions,
            )
        slices, cut = plan
        rest = tuple(name for name in outputs if name not in placed)

        def chunk(start: int) -> Request:
            count = min(slice_chunk, slices - start)
            request_inputs = [
                t.request_input(start, count) if t.name in cut else t.request_input()
                for t in shared
            ]
            return request_inputs, requested(start, count)

        answers = self._infer_in_flight(
            model,
            [partial(chunk, start) for start in range(0, slices, slice_chunk)],
            rest,
            deadline,
            version,
        )
        joined = join_slices([answer.outputs for answer in answers], rest) if rest else {}
        for name, (tensor, region) in placed.items():
            joined[name] = region.array(tensor.shape, tensor.dtype)
        ran = sorted({answer.model_version for answer in answers})
        return Inference({name: joined[name] for name in outputs}, ",".join(ran))

    def _infer(
        self,
        model: str,
        request_inputs: list[grpcclient.InferInput],
        outputs: tuple[str, ...],
        version: str,
        deadline: float,
        *,
        requested: list[grpcclient.InferRequestedOutput] | None = None,
        regions: Mapping[str, Region] | None = None,
    ) -> Inference:
        """One request; the outputs of ``regions`` are read where Triton wrote them."""
        try:
            result = self._client.infer(
                model,
                request_inputs,
                model_version=version,
                outputs=requested or [grpcclient.InferRequestedOutput(name) for name in outputs],
                client_timeout=deadline,
            )
        except InferenceServerException as exc:
            raise _translated(exc, model, deadline) from exc
        return _answer(result, model, outputs, regions)

    def _infer_in_flight(
        self,
        model: str,
        requests: list[Callable[[], Request]],
        outputs: tuple[str, ...],
        deadline: float,
        version: str,
    ) -> list[Inference]:
        """Each of ``requests`` (made when its turn comes) as its own asynchronous
        request, ``max_in_flight`` at a time; the ``outputs`` of their answers in order,
        or the first failure once none is in flight."""
        results: list[Inference | None] = [None] * len(requests)
        failures: list[InferenceServerException | InferenceError] = []
        slots = threading.Semaphore(self.max_in_flight)
        finished = threading.Semaphore(0)
        end = time.monotonic() + deadline

        def done(
            index: int, result: grpcclient.InferResult, error: InferenceServerException | None
        ) -> None:
            try:
                if error is not None:
                    failures.append(error)
                else:
                    results[index] = _answer(result, model, outputs)
            except InferenceError as exc:
                failures.append(exc)
            finally:
                slots.release()
                finished.release()

        def wait(semaphore: threading.Semaphore) -> None:
            if not semaphore.acquire(timeout=max(end - time.monotonic(), 0.0)):
                raise InferenceTimeoutError(
                    f"Triton model '{model}' gave no answer within its deadline of {deadline:g} s"
                )

        sent = 0
        try:
            for index, make in enumerate(requests):
                wait(slots)
                if failures:
                    slots.release()
                    break
                request_inputs, requested = make()
                self._client.async_infer(
                    model,
                    request_inputs,
                    partial(done, index),
                    model_version=version,
                    outputs=requested,
                    client_timeout=max(end - time.monotonic(), 0.001),
                )
                sent += 1
        except InferenceServerException as exc:
            failures.append(exc)
        for _ in range(sent):
            wait(finished)
        if failures:
            first = failures[0]
            if isinstance(first, InferenceError):
                raise first
            raise _translated(first, model, deadline) from first
        return [r for r in results if r is not None]


# A request: its inputs, and the outputs it asks for.
Request = tuple[list[grpcclient.InferInput], list[grpcclient.InferRequestedOutput]]


def _grpc_request(
    inputs: Mapping[str, npt.NDArray[np.generic]],
    requested: list[grpcclient.InferRequestedOutput],
) -> Request:
    return _grpc_inputs(inputs), requested


def _grpc_inputs(inputs: Mapping[str, npt.NDArray[np.generic]]) -> list[grpcclient.InferInput]:
    request_inputs = []
    for name, array in inputs.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        request_inputs.append(tensor)
    return request_inputs


@dataclass(frozen=True)
class Inference:
    """What one inference gave: the named outputs, and the model version that ran
    (several, comma-separated, should a model change between a job's chunks)."""

    outputs: dict[str, npt.NDArray[np.generic]]
    model_version: str


def _answer(
    result: grpcclient.InferResult,
    model: str,
    outputs: tuple[str, ...],
    regions: Mapping[str, Region] | None = None,
) -> Inference:
    """The outputs of ``result``: those Triton wrote into ``regions`` read there, the
    others from the response."""
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for name in outputs:
        region = (regions or {}).get(name)
        if region is not None:
            tensor = result.get_output(name)
            if tensor is None:
                raise InferenceError(f"Triton model '{model}' returned no output '{name}'")
            dtype = np.dtype(triton_to_np_dtype(tensor.datatype))
            arrays[name] = region.array(tuple(int(d) for d in tensor.shape), dtype)
            continue
        array = result.as_numpy(name)
        if array is None:
            raise InferenceError(f"Triton model '{model}' returned no output '{name}'")
        arrays[name] = array
    return Inference(arrays, str(result.get_response().model_version))


def _translated(exc: InferenceServerException, model: str, deadline: float) -> InferenceError:
    status = exc.status() or ""
    message = f"Triton model '{model}' failed: {exc.message()}"
    if "DEADLINE" in status:
        return InferenceTimeoutError(
            f"Triton model '{model}' gave no answer within its deadline of {deadline:g} s"
        )
    if "UNAVAILABLE" in status:
        return TritonUnavailableError(message)
    return InferenceError(message)


def _compare(
    kind: str, declared: tuple[TensorSpec, ...], served: tuple[ModelTensor, ...]
) -> list[str]:
    problems: list[str] = []
    by_name = {t.name: t for t in served}
    for spec in declared:
        tensor = by_name.get(spec.name)
        if tensor is None:
            problems.append(
                f"{kind} '{spec.name}' is not served (model has {sorted(by_name) or 'none'})"
            )
            continue
        if tensor.datatype != spec.datatype:
            problems.append(
                f"{kind} '{spec.name}' is {tensor.datatype} in Triton,"
                f" {spec.datatype} in the plugin"
            )
        if not _shapes_agree(spec.shape, tensor.shape):
            problems.append(
                f"{kind} '{spec.name}' has shape {list(tensor.shape)} in Triton,"
                f" {list(spec.shape)} in the plugin"
            )
    return problems


def _batch_problems(spec: PluginSpec, max_batch_size: int) -> list[str]:
    """What stops a model that batches from taking the plugin's requests: it takes at
    most ``max_batch_size`` slices in one, so the plugin must send chunks no larger."""
    if max_batch_size <= 0:
        return []
    if spec.slice_chunk is None:
        sent = "whole volumes (no slice_chunk)"
    elif spec.slice_chunk > max_batch_size:
        sent = f"chunks of {spec.slice_chunk} slices"
    else:
        return []
    return [
        f"the model takes at most {max_batch_size} slices a request (max_batch_size);"
        f" the plugin sends {sent}"
    ]


def _shapes_agree(declared: tuple[int, ...], served: tuple[int, ...]) -> bool:
    if len(declared) != len(served):
        return False
    return all(d == s or -1 in (d, s) for d, s in zip(declared, served, strict=True))
