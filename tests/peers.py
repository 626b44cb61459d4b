"""Real peers for tests: Orthanc as the PACS, DCMTK tools, and Infergate as a process.

Nothing here is a mock: each helper starts or runs the real program on loopback
ports. A missing program fails the test that needs it (CI installs them all).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import yaml

from infergate.config import TritonSettings
from infergate.testing import PhantomIdentity

REPO = Path(__file__).resolve().parents[1]
# Real DICOM data that no one on this project wrote, with its licence and origin.
REAL_DATA = REPO / "tests" / "data"
# DCMTK tools and Orthanc leave Nagle's algorithm on unless told (DCMTK FAQ #48).
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


# Ports for the servers the tests start: below the kernel's ephemeral range (32768 and
# up on Linux), so no outgoing connection takes one meanwhile, and a block of its own
# for each pytest-xdist worker (PYTEST_XDIST_WORKER gw0, gw1, ...), so two workers
# never hand out the same one. Within a process, each port is handed out once.
_PORT_BASE, _PORT_BLOCK, _PORT_BLOCKS = 12000, 2500, 8  # 12000-31999
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nothing listens on now, not handed out before by this
    process (once its block is used up, the earliest are handed out again)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = _PORT_BASE + (int(worker) if worker.isdigit() else 0) % _PORT_BLOCKS * _PORT_BLOCK
    for _ in range(2):
        for port in range(first, first + _PORT_BLOCK):
            if port in _handed_out:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue  # in use: someone else's
            _handed_out.add(port)
            return port
        _handed_out.clear()  # every one handed out: long since released, the most of them
    raise RuntimeError(f"no free port in {first}-{first + _PORT_BLOCK - 1}")


def assert_still_connected(*socks: socket.socket) -> None:
    """The server has not closed these connections (nothing to read, no EOF); closes them."""
    for sock in socks:
        sock.setblocking(False)
        try:
            sock.recv(1)
        except BlockingIOError:
            pass
        else:
            raise AssertionError("the server closed a connection it should still hold")
        finally:
            sock.close()


def require_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; .ci/run installs it (apt-get)")
    return path


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Orthanc:
    """An Orthanc process with its own JSON config and storage, on loopback ports."""

    workdir: Path
    ae_title: str = "TESTPACS"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    # Its DICOMweb plugin (Debian's orthanc-dicomweb) at /dicom-web, and HTTP users
    # (name: password) it asks for; the REST helpers log in as the first.
    dicomweb: bool = False
    users: dict[str, str] | None = None

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self) -> None:
        binary = require_program("Orthanc")
        plugins = []
        if self.dicomweb:
            plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
            if not plugin.exists():
                raise RuntimeError(f"{plugin} missing: apt-get install orthanc-dicomweb")
            plugins.append(str(plugin))
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "infergate-test",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users or {},
            "DicomCheckCalledAet": True,
            "Plugins": plugins,
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config))
        log = (self.workdir / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [binary, str(path)], stdout=log, stderr=subprocess.STDOUT, env=PEER_ENV
        )
        wait_until(self._alive, 30, "Orthanc's REST API")

    def _alive(self) -> bool:
        try:
            self.get("/system")
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def _request(self, path: str, body: Any = None) -> urllib.request.Request:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.users:
            name, password = next(iter(self.users.items()))
            login = base64.b64encode(f"{name}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {login}"
        data = None if body is None else json.dumps(body).encode()
        return urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, headers=headers
        )

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self._request(path), timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: Any) -> Any:
        with urllib.request.urlopen(self._request(path, body), timeout=30) as r:
            return json.loads(r.read())

    def instance_file(self, orthanc_id: str) -> bytes:
        request = self._request(f"/instances/{orthanc_id}/file")
        with urllib.request.urlopen(request, timeout=30) as r:
            data: bytes = r.read()
            return data

    def find_instances(self, study_uid: str, modality: str) -> list[str]:
        found: list[str] = self.post(
            "/tools/find",
            {
                "Level": "Instance",
                "Query": {"StudyInstanceUID": study_uid, "Modality": modality},
            },
        )
        return found


@dataclass
class InfergateProcess:
    """``infergate serve`` as a child process, with its JSON log lines kept in a file."""

    workdir: Path
    config: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None
    runs: int = 0
    # Added to the environment (e.g. PYTHONPATH for a plugin installed elsewhere).
    extra_env: dict[str, str] | None = None

    @property
    def port(self) -> int:
        port: int = self.config["ingest"]["port"]
        return port

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.config['ops']['port']}"

    def http(self, path: str) -> tuple[int, str]:
        """GET ``path`` on the ops endpoint: (status, body), 4xx and 5xx included."""
        try:
            with urllib.request.urlopen(self.ops_url + path, timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    @property
    def log_path(self) -> Path:
        return self.workdir / f"infergate-{self.runs}.log"

    def start(self, wait_ready: bool = True) -> None:
        self.runs += 1
        config_path = self.workdir / "infergate.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        out = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "infergate.cli", "serve", "--config", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**PEER_ENV, **(self.extra_env or {})},
            cwd=self.workdir,
        )
        if wait_ready:
            wait_until(self._ready_or_dead, 120, "infergate serve to be ready")

    def _ready_or_dead(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"infergate serve exited: {self.log_path.read_text()[-3000:]}")
        return any(e["event"] == "serve.ready" for e in self.events(self.runs))

    def events(self, run: int | None = None) -> list[dict[str, Any]]:
        """Parsed log events of one run (default: every run so far)."""
        runs = [run] if run is not None else list(range(1, self.runs + 1))
        events: list[dict[str, Any]] = []
        for number in runs:
            path = self.workdir / f"infergate-{number}.log"
            if not path.exists():
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            # The last line may be half-written while the server runs: whole lines only.
            for line in text.split("\n")[:-1]:
                if line.startswith("{"):
                    events.append(json.loads(line))
        return events

    def log_text(self) -> str:
        return "".join(
            (self.workdir / f"infergate-{n}.log").read_text(errors="replace")
            for n in range(1, self.runs + 1)
        )

    def wait_event(
        self,
        name: str,
        timeout: float,
        count: int = 1,
        fail_on: tuple[str, ...] = (
            "inference.job.failed",
            "export.dead_letter",
            "export.retrying",
            "work.stage.failed",
        ),
    ) -> list[dict[str, Any]]:
        """Wait for ``count`` events named ``name``; an event in ``fail_on`` fails at once."""

        def found() -> list[dict[str, Any]]:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"infergate exited: {self.log_path.read_text()[-3000:]}")
            events = self.events()
            failures = [e for e in events if e["event"] in fail_on]
            if failures:
                raise RuntimeError(f"infergate reported {failures[0]}")
            matches = [e for e in events if e["event"] == name]
            return matches if len(matches) >= count else []

        result: list[dict[str, Any]] = wait_until(found, timeout, f"log event {name}")
        return result

    def kill(self) -> None:
        """SIGKILL, as a crash would; the embedded tritonserver child is killed too."""
        if self.process is None:
            return
        triton_pids = child_pids(self.process.pid)
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        for pid in triton_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process = None

    def kill_gateway_only(self) -> None:
        """SIGKILL the gateway alone, as the OOM killer does: its children (the
        embedded tritonserver, listener processes) are left to end by themselves."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process = None


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    tree: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(child_pids(current))
    return tree


def _rss_pss_kib(pid: int) -> tuple[int, int]:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:  # it ended meanwhile
        return 0, 0
    values = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            values[name] = int(rest.split()[0])
    return values.get("Rss", 0), values.get("Pss", 0)


class TreeMemory(threading.Thread):
    """The summed RSS and PSS of a process and its descendants, sampled until stopped;
    their peaks, and the sums when :meth:`mark_idle` was called."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss = self.peak_pss = self.idle_rss = self.idle_pss = 0
        self._halt = threading.Event()

    def sample(self) -> tuple[int, int]:
        sums = [_rss_pss_kib(p) for p in process_tree(self.pid)]
        return sum(r for r, _ in sums), sum(p for _, p in sums)

    def mark_idle(self) -> None:
        self.idle_rss, self.idle_pss = self.sample()
        self.peak_rss, self.peak_pss = self.idle_rss, self.idle_pss

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            rss, pss = self.sample()
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join()
        return {
            "peak_rss_mib": self.peak_rss / 1024,
            "peak_pss_mib": self.peak_pss / 1024,
            "rss_over_idle_mib": (self.peak_rss - self.idle_rss) / 1024,
            "pss_over_idle_mib": (self.peak_pss - self.idle_pss) / 1024,
        }


# The last commit before issue 14 (memory and overhead): what it is measured against.
PREVIOUS_RELEASE = "b1ddaee"


def reference_tree(rev: str, into: Path) -> dict[str, str]:
    """The code of commit ``rev`` unpacked in ``into``, and the environment that runs
    it with this virtual environment's packages."""
    code = into / "code"
    code.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    path = into / "path"
    path.mkdir()
    (path / "infergate").symlink_to(code / "server")
    (path / "infergate_plugins").symlink_to(code / "plugins")
    return {"PYTHONPATH": str(path), "MODEL_REPOSITORY": str(code / "model_repository")}


def infergate_of(
    workdir: Path, config: dict[str, Any], code: dict[str, str] | None = None
) -> InfergateProcess:
    """An ``infergate serve`` in ``workdir`` (made here), not yet started: this tree's,
    or, given ``code`` (:func:`reference_tree`), that commit's with its own models."""
    env = {}
    if code is not None:
        config["triton"]["model_repository"] = code["MODEL_REPOSITORY"]
        env = {"PYTHONPATH": code["PYTHONPATH"]}
    server = InfergateProcess(workdir, config, extra_env=env)
    server.workdir.mkdir(parents=True)
    return server


def process_name(pid: int) -> str | None:
    """The command name of a live process (not a zombie), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, state = stat.split("(", 1)[1].rsplit(")", 1)
    return None if state.split()[0] == "Z" else name


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(status.parent.name))
    return children


def triton_settings(repository: Path, **values: Any) -> TritonSettings:
    """An embedded Triton on free loopback ports, serving ``repository``."""
    return TritonSettings.model_validate(
        {
            "model_repository": repository,
            "grpc_port": free_port(),
            "http_port": free_port(),
            "metrics_port": free_port(),
            **values,
        }
    )


def infergate_config(
    var_dir: Path, orthanc: Orthanc | None, quiet_s: float = 1.0
) -> dict[str, Any]:
    """Settings for a test instance: free ports, fast assembly, Orthanc as destination."""
    config: dict[str, Any] = {
        "ingest": {"port": free_port(), "host": "127.0.0.1"},
        "storage": {"var_dir": str(var_dir)},
        "assembly": {"quiet_period_s": quiet_s, "poll_interval_s": 0.2},
        "triton": {
            "model_repository": str(REPO / "model_repository"),
            "grpc_port": free_port(),
            "http_port": free_port(),
            "metrics_port": free_port(),
        },
        "export": {"retry_delay_s": 1.0},
        "ops": {"port": free_port()},
    }
    if orthanc is not None:
        config["export"]["destination"] = {
            "ae_title": orthanc.ae_title,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
        }
    return config


def run_cli(
    *arguments: str,
    cwd: Path,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``infergate ARGUMENTS`` (``python -m infergate.cli``) run to its end in ``cwd``,
    its output captured; its exit status is for the caller to check."""
    return subprocess.run(
        [sys.executable, "-m", "infergate.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=PEER_ENV if env is None else env,
        cwd=cwd,
        check=False,
    )


def json_events(output: str) -> list[dict[str, Any]]:
    """The JSON log events among the lines of ``output``."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def storescu(
    port: int, files: list[Path], called_ae: str = "INFERGATE", options: tuple[str, ...] = ()
) -> None:
    """Send ``files`` with DCMTK's storescu in one association; raise if it fails.

    ``options`` are storescu's own, e.g. ``("-xd",)`` to send deflated.
    """
    binary = require_program("storescu")
    result = subprocess.run(
        [
            binary,
            *options,
            "-aet",
            "SCANNER1",
            "-aec",
            called_ae,
            "127.0.0.1",
            str(port),
            *[str(f) for f in files],
        ],
        capture_output=True,
        text=True,
        env=PEER_ENV,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr[-2000:]}")


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dciodvfy reports for ``path`` (warnings are not errors)."""
    binary = require_program("dciodvfy")
    result = subprocess.run(
        [binary, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def walk_content(items: Any, *, library: bool = True) -> Iterator[Any]:
    """Every SR content item below ``items``, depth first; with ``library=False``
    none of the Image Library's (TID 1600), which lists every source image."""
    for item in items:
        if not library and item.ConceptNameCodeSequence[0].CodeMeaning == "Image Library":
            continue
        yield item
        if "ContentSequence" in item:
            yield from walk_content(item.ContentSequence, library=library)


def pip_install(source: Path, target: Path, build: Path) -> Path:
    """Install the package in ``source`` with pip into ``target``, as an AI team
    installs its plugin beside Infergate; ``target`` goes on PYTHONPATH."""
    # setuptools builds in the source folder: build a copy, not the repository's files.
    copy = shutil.copytree(source, build / source.name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",  # setuptools from this environment: no network
            "--target",
            str(target),
            str(copy),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=build,
        env=PEER_ENV,
    )
    return target


def copy_as_new_study(
    paths: list[Path], folder: Path, change: Callable[[pydicom.Dataset], None] | None = None
) -> tuple[str, list[Path]]:
    """The instances at ``paths`` as a study of their own: new study, series and SOP
    Instance UIDs, each changed by ``change`` if given, everything else as it was.
    Returns the study UID and the copies."""
    folder.mkdir()
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    copies = []
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        if change is not None:
            change(ds)
        target = folder / f"{index}.dcm"
        ds.save_as(target)
        copies.append(target)
    return study, copies


def assert_no_patient_data(text: str, identity: PhantomIdentity) -> None:
    """None of the sentinel patient values written into a phantom appear in ``text``."""
    for value in (
        identity.patient_name,
        identity.patient_id,
        identity.accession_number,
        identity.patient_birth_date,
    ):
        assert value not in text


def poisoned_copy(paths: list[Path], folder: Path) -> tuple[str, list[Path]]:
    """The instances at ``paths`` as a new study with a non-number in Rescale Slope
    (DS), as a broken modality writes it; returns its study UID and the copies."""

    def marked(ds: pydicom.Dataset) -> None:
        ds.RescaleSlope = "7.77"

    study_uid, copies = copy_as_new_study(paths, folder, marked)
    for path in copies:
        # pydicom will not write a bad DS: the header is before the pixels.
        path.write_bytes(path.read_bytes().replace(b"7.77", b"abcd", 1))
    return study_uid, copies


# Where tests keep what a person may want to look at afterwards (screenshots).
ARTIFACTS = Path(os.environ.get("INFERGATE_TEST_ARTIFACTS", REPO / "test-artifacts"))


def headless_page(url: str, screenshot_name: str) -> tuple[str, list[str]]:
    """``url`` in Debian's headless chromium: its DOM after loading, and every console
    message it logged (errors included); a screenshot is kept in ARTIFACTS."""
    browser = require_program("chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr"]
    common += ["--v=0", "--window-size=1280,2200", "--no-first-run"]
    dumped = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    )
    shot = subprocess.run(
        [*common, f"--screenshot={ARTIFACTS / screenshot_name}", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    console = [line for line in (dumped.stderr + shot.stderr).splitlines() if ":CONSOLE" in line]
    return dumped.stdout, console
