"""The Triton endpoints' settings, and jobs in turn over endpoints none of which is
ready (real gRPC clients against loopback ports where nothing listens). Ready ones,
and one that failed skipped until it answers ready again, are in
tests/integration/test_remote_triton.py, against real tritonservers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infergate.config import TritonSettings
from infergate.inference.endpoints import Endpoints
from peers import free_port


def _settings(*urls: str) -> TritonSettings:
    return TritonSettings(mode="remote", urls=urls, request_timeout_s=5)


@pytest.fixture
def silent() -> Iterator[Endpoints]:
    """Two endpoints where nothing listens."""
    endpoints = Endpoints.for_settings(
        _settings(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    )
    yield endpoints
    endpoints.close()


def test_endpoints_come_from_urls_or_url() -> None:
    assert TritonSettings(mode="remote", url="a:1").endpoints == ("a:1",)
    assert TritonSettings(mode="remote", urls=("a:1", "b:2")).endpoints == ("a:1", "b:2")
    assert TritonSettings(grpc_port=9001).endpoints == ("127.0.0.1:9001",)
    with pytest.raises(ValueError, match="twice"):
        TritonSettings(mode="remote", urls=("a:1", "a:1"))


def test_shared_memory_only_with_an_endpoint_on_this_host() -> None:
    settings = _settings("127.0.0.1:8001", "triton-1.infergate.svc:8001")
    assert settings.shared_memory_with("127.0.0.1:8001")
    assert not settings.shared_memory_with("triton-1.infergate.svc:8001")
    forced = TritonSettings(mode="remote", urls=("gpu-host:8001",), shared_memory="on")
    assert forced.shared_memory_with("gpu-host:8001")


def test_none_ready_and_jobs_still_go_in_turn_to_each(silent: Endpoints) -> None:
    assert silent.check() == set()
    assert not silent.is_ready()
    first, second = silent.urls
    # None answers ready: a job tries each in turn (and fails as unavailable there).
    assert [silent.pick() for _ in range(4)] == [first, second, first, second]
