"""Running one job: volume, the plugin's preprocess, Triton, postprocess, result objects."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from tritonclient.utils import triton_to_np_dtype

from infergate.config import Settings
from infergate.errors import InfergateError, JobStepError, PluginError, unexpected
from infergate.inference.triton import TritonClient
from infergate.inference.volume import load_series
from infergate.logs import get_logger
from infergate.plugin_api import PluginSpec
from infergate.plugins import LoadedPlugin
from infergate.results.identity import ResultIdentity
from infergate.results.writer import encode, write_result
from infergate.store import CriticalFinding, JobRow, ResultRow
from infergate.work.states import ResultKind

log = get_logger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class JobOutcome:
    results: list[ResultRow]
    timings_s: dict[str, float]
    # The critical findings (plugin_api.Evaluation.critical) the job's SR reports.
    critical: tuple[CriticalFinding, ...] = ()
    # The peak resident memory of the job's own process (0 when it ran on a thread
    # of the gateway, whose peak is not the job's).
    peak_memory_bytes: int = 0


def _plugin_step(plugin: str, step: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except Exception as exc:  # plugin code may raise anything; it fails its own job
        raise PluginError(f"plugin {plugin} failed in {step}: {unexpected(exc)}") from exc


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """One of the job's own steps: what it raises on purpose passes; anything else
    fails the job as :class:`JobStepError`, naming the step."""
    try:
        yield
    except InfergateError:
        raise
    except Exception as exc:
        raise JobStepError(f"{name} failed: {unexpected(exc)}") from exc


def _known_outputs(
    spec: PluginSpec, inputs: Mapping[str, npt.NDArray[np.generic]]
) -> dict[str, tuple[tuple[int, ...], np.dtype[np.generic]]]:
    """The outputs whose shape is an input's (``TensorSpec.shape_of``): their shape and
    type before the model runs."""
    known = {}
    for tensor in spec.outputs:
        like = inputs.get(tensor.shape_of or "")
        if like is not None:
            known[tensor.name] = (like.shape, np.dtype(triton_to_np_dtype(tensor.datatype)))
    return known


# Series numbers of one plugin's results and the next plugin's are this far apart.
SERIES_STEP = 10


@dataclass(frozen=True)
class JobInput:
    """What a job needs from the store, read before it runs: it runs apart from it."""

    job: JobRow
    paths: list[Path]  # the series' instances in the spool
    supersedes: str | None  # the earlier job whose results these replace
    # The plugin's place among the enabled plugins (by name): its results' series
    # numbers are results.*_series_number + 10 times it, so that two plugins' results
    # in one study never share a series number.
    plugin_rank: int = 0
    # The Triton endpoint (gRPC host:port) the job sends its request to ("": the first
    # of triton.*).
    triton_url: str = ""


def run_job(
    work: JobInput,
    plugin: LoadedPlugin,
    triton: TritonClient,
    settings: Settings,
) -> JobOutcome:
    """Run a job to written result files; the caller records them in the store."""
    job = work.job
    spec = plugin.spec
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal started
        now = time.perf_counter()
        timings[name] = round(now - started, 3)
        started = now

    # The volume is built where the model reads it (the job's shared memory) and let
    # go once the plugin is done with it: nothing the size of the volume outlives it.
    memory = triton.job_memory()
    try:
        with step("volume building"):
            loaded = load_series(
                work.paths, settings.volume, volume_type=spec.volume_type, allocate=memory.empty
            )
        lap("volume_s")
        if loaded.excluded or loaded.resampled or loaded.assumed:
            log.info(
                "inference.volume.adjusted",
                excluded=list(loaded.excluded),
                resampled=loaded.resampled,
                assumed=list(loaded.assumed),
                slices=len(loaded.headers),
                grid_slices=loaded.series.volume.shape[0],
            )
        inputs = _plugin_step(
            spec.name, "preprocess", lambda: plugin.plugin.preprocess(loaded.series)
        )
        lap("preprocess_s")
        with step("inference"):
            inference = triton.infer(
                spec.model_name,
                inputs,
                tuple(t.name for t in spec.outputs),
                version=spec.model_version,
                timeout_s=spec.deadline_s or settings.triton.request_timeout_s,
                slice_chunk=spec.slice_chunk,
                memory=memory,
                known_outputs=_known_outputs(spec, inputs),
            )
        del inputs
        lap("inference_s")
        findings = _plugin_step(
            spec.name,
            "postprocess",
            partial(plugin.plugin.postprocess, loaded.series, inference.outputs),
        )
        model_version = inference.model_version
        del inference  # the model's outputs: the plugin made its findings of them
        loaded = loaded.without_volume()
    finally:
        memory.close()
    lap("postprocess_s")
    identity = ResultIdentity(
        job_id=job.job_id,
        uid_root=settings.results.uid_root,
        device=settings.results.device,
        seg_series_number=settings.results.seg_series_number + SERIES_STEP * work.plugin_rank,
        sr_series_number=settings.results.sr_series_number + SERIES_STEP * work.plugin_rank,
        supersedes=work.supersedes,
        model_version=model_version,
    )
    with step("encoding"):
        encoded = encode(loaded, findings, spec, identity)
    lap("encode_s")
    directory: Path = settings.storage.results_dir / job.job_id
    with step("writing results"):
        rows = [
            ResultRow(
                sop_instance_uid=result.sop_instance_uid,
                job_id=job.job_id,
                kind=result.kind,
                path=write_result(directory, result),
                priority="urgent" if findings.urgent else "normal",
            )
            for result in encoded
        ]
    lap("write_s")
    log.info(
        "inference.job.findings",
        plugin=spec.name,
        slices=len(loaded.headers),
        urgent=findings.urgent,
        supersedes_job=identity.supersedes,
        **{k: v for k, v in findings.summary.items()},
    )
    report = next(r for r in rows if r.kind is ResultKind.SR)
    critical = tuple(
        CriticalFinding(
            name=e.name,
            value=e.value,
            segment_number=e.segment_number,
            plugin=spec.name,
            plugin_version=spec.version,
            title=spec.title or spec.name,
            report_uid=report.sop_instance_uid,
        )
        for e in findings.evaluations
        if e.critical
    )
    return JobOutcome(results=rows, timings_s=timings, critical=critical)
