"""A local Triton Inference Server, started and stopped by Infergate.

The ``nvidia-pytriton`` wheel ships a real ``tritonserver`` (2.51) with the Python
backend. Its backend directory is assembled under the var folder: the backend
library and utilities from the wheel plus the stub built for this interpreter's
Python version. Models in the Python backend run in this interpreter's
environment, so numpy and scipy come from Infergate's own dependencies.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from infergate.config import TritonSettings
from infergate.errors import TritonUnavailableError
from infergate.inference.port_holders import port_holders, processes_running
from infergate.lifetime import die_with_parent
from infergate.logs import get_logger

log = get_logger(__name__)


def _pytriton_root() -> Path:
    """Where the nvidia-pytriton package is: found, not imported (importing it takes
    ~0.2 s, and only its tritonserver binary and backend files are used)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise TritonUnavailableError(
            "the embedded Triton needs the nvidia-pytriton package; install Infergate with its"
            " dependencies, or set triton.mode to remote"
        )
    return Path(spec.origin).parent


def prepare_backends(target: Path) -> Path:
    """Assemble the Python backend folder Triton loads; returns the backend directory."""
    root = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonUnavailableError(
            f"nvidia-pytriton has no Python backend stub for Python {version}"
        )
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        destination = python_dir / source.name
        if not destination.exists() or destination.stat().st_size != source.stat().st_size:
            shutil.copy2(source, destination)
    return target


_LOOPBACK = "127.0.0.1"
# Seconds tritonserver waits for requests in flight when told to stop.
_EXIT_TIMEOUT_S = 5
# How often readiness is asked at start (a gRPC call on loopback costs ~1 ms): the
# gateway is ready within this of Triton's own readiness.
_READY_POLL_S = 0.05


def _stop_process(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent that is not us to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _other_gateway(tritonserver: int) -> int | None:
    """The pid of the live process, not init and not this one, that started the
    ``tritonserver`` process: a gateway still running it. None for one left over
    (its parent gone, so init adopted it) or one this process started."""
    try:
        stat = Path(f"/proc/{tritonserver}/stat").read_text()
    except OSError:
        return None
    parent = int(stat.rsplit(")", 1)[1].split()[1])
    return parent if parent not in (0, 1, os.getpid()) and _alive(parent) else None


class EmbeddedTriton:
    """The ``tritonserver`` process; ``start()`` returns when it is ready."""

    def __init__(
        self, settings: TritonSettings, work_dir: Path, models: tuple[str, ...] | None = None
    ) -> None:
        self._settings = settings
        # The models to load (explicit model control: only what the enabled plugins
        # call, which starts sooner and holds less memory); None: the whole repository.
        self._models = models
        # tritonserver runs in work_dir; every path it is given must be absolute.
        self._work_dir = work_dir.resolve()
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path = work_dir / "tritonserver.log"
        self._stopped = False
        self._restart_delay_s = 0.0
        self._next_restart = 0.0
        self.restarts = 0

    @property
    def url(self) -> str:
        """Its gRPC endpoint, host:port."""
        return self._settings.grpc_url

    @property
    def pid(self) -> int | None:
        """The tritonserver's process id, once launched."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Launch tritonserver and wait until it is ready."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start tritonserver without waiting for it (:meth:`wait_ready` does): the
        gateway starts its listeners while Triton loads its models."""
        package = _pytriton_root()
        binary = package / "tritonserver" / "bin" / "tritonserver"
        backends = prepare_backends(self._work_dir / "backends")
        libs = package.parent / "nvidia_pytriton.libs"
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        # The backend stub embeds an interpreter that finds its prefix, and so this
        # environment's packages, through the first python3 on PATH.
        env["PATH"] = os.pathsep.join(
            p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p
        )
        repository = self._settings.model_repository.resolve()
        command = [
            str(binary),
            f"--model-repository={repository}",
            f"--backend-directory={backends}",
            # Loopback only: Triton's endpoints have no authentication.
            f"--grpc-address={_LOOPBACK}",
            f"--grpc-port={self._settings.grpc_port}",
            f"--http-address={_LOOPBACK}",
            f"--http-port={self._settings.http_port}",
            f"--metrics-address={_LOOPBACK}",
            f"--metrics-port={self._settings.metrics_port}",
            "--allow-http=true",
            "--exit-on-error=false",
            "--strict-readiness=false",
            "--log-verbose=0",
            # At stop the gateway has put back the jobs it still ran: requests in flight
            # serve no one, so Triton waits this long for them, not its default 30 s.
            f"--exit-timeout-secs={_EXIT_TIMEOUT_S}",
        ]
        if self._models is not None:
            command.append("--model-control-mode=explicit")
            command.extend(f"--load-model={name}" for name in sorted(set(self._models)))
        self._work_dir.mkdir(parents=True, exist_ok=True)
        self._clear_stale(backends)
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._work_dir,
                # Only prctl and getppid run in the child, nothing that takes a lock.
                preexec_fn=die_with_parent(os.getpid()),  # noqa: PLW1509
            )
        log.info(
            "triton.embedded.starting",
            pid=self._process.pid,
            grpc_port=self._settings.grpc_port,
            model_repository=str(repository),
            models="all" if self._models is None else sorted(set(self._models)),
            log_file=str(self.log_path),
        )

    def serving_gateway(self) -> int | None:
        """The pid of the running gateway whose tritonserver (of this work folder)
        holds our gRPC port, if one does: ``check`` uses that Triton as it is."""
        ours = f"--backend-directory={self._work_dir / 'backends'}"
        for holder in port_holders(self._settings.grpc_port):
            if holder.name == "tritonserver" and ours in holder.command_line:
                gateway = _other_gateway(holder.pid)
                if gateway is not None:
                    return gateway
        return None

    def _clear_stale(self, backends: Path) -> None:
        """Stop a ``tritonserver`` an earlier run of ours left on our ports (it was
        started with our backend directory); refuse to start over anything else."""
        ports = {
            "grpc_port": self._settings.grpc_port,
            "http_port": self._settings.http_port,
            "metrics_port": self._settings.metrics_port,
        }
        ours = f"--backend-directory={backends}"
        for key, port in ports.items():
            for holder in port_holders(port):
                if holder.name != "tritonserver" or ours not in holder.command_line:
                    raise TritonUnavailableError(
                        f"port {port} (triton.{key}) is held by process {holder.pid}"
                        f" ({holder.name}); stop it or choose another port"
                    )
                gateway = _other_gateway(holder.pid)
                if gateway is not None:
                    # Not left over: the Triton of a gateway that runs on this folder.
                    raise TritonUnavailableError(
                        f"port {port} (triton.{key}) is held by the tritonserver of a running"
                        f" gateway (process {gateway}) on the same state folder"
                    )
                log.warning(
                    "triton.embedded.stale_stopped",
                    pid=holder.pid,
                    port=port,
                    reason="a tritonserver left by an earlier run of this gateway",
                )
                _stop_process(holder.pid)
        stub = backends / "python" / "triton_python_backend_stub"
        for pid in processes_running(stub):
            log.warning(
                "triton.embedded.stale_stopped",
                pid=pid,
                reason="a Python-backend stub left by a tritonserver of an earlier run",
            )
            _stop_process(pid)

    def wait_ready(self) -> None:
        # Imported here, not with this module: the gateway launches tritonserver before
        # it pays for importing the gRPC client (~0.3 s of a start).
        from infergate.inference.triton import TritonClient  # noqa: PLC0415

        deadline = time.monotonic() + self._settings.startup_timeout_s
        client = TritonClient(self._settings.grpc_url, self._settings.request_timeout_s)
        try:
            while time.monotonic() < deadline:
                if self._process is not None and self._process.poll() is not None:
                    raise TritonUnavailableError(
                        f"tritonserver exited with code {self._process.returncode} during start;"
                        f" see {self.log_path}: {self._log_tail()}"
                    )
                if client.is_ready():
                    log.info("triton.embedded.ready", grpc_port=self._settings.grpc_port)
                    return
                time.sleep(_READY_POLL_S)
        finally:
            client.close()
        self.stop()
        raise TritonUnavailableError(
            f"tritonserver was not ready after {self._settings.startup_timeout_s:.0f} s;"
            f" see {self.log_path}"
        )

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def watch(self) -> None:
        """Start tritonserver again if it died. Its jobs meanwhile find it unavailable
        and wait to be retried (``triton.unavailable_attempts``); a restart that fails
        is tried again after a delay that doubles up to ``triton.max_retry_delay_s``."""
        process = self._process
        if self._stopped or (process is not None and process.poll() is None):
            return
        now = time.monotonic()
        if now < self._next_restart:
            return
        if process is not None:
            log.error(
                "triton.embedded.died", returncode=process.returncode, log_tail=self._log_tail()
            )
            self._process = None
        try:
            self.start()
        except TritonUnavailableError as exc:
            self._restart_delay_s = min(
                max(2 * self._restart_delay_s, self._settings.retry_delay_s, 1.0),
                max(self._settings.max_retry_delay_s, 1.0),
            )
            self._next_restart = time.monotonic() + self._restart_delay_s
            log.error(
                "triton.embedded.restart_failed", reason=str(exc), retry_in_s=self._restart_delay_s
            )
            return
        self._restart_delay_s = 0.0
        self.restarts += 1
        log.warning("triton.embedded.restarted", restarts=self.restarts)

    def stop(self) -> None:
        self._stopped = True
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=_EXIT_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.info("triton.embedded.stopped", returncode=process.returncode)
