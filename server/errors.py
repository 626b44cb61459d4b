"""The one exception hierarchy of Infergate.

Everything the gateway raises on purpose derives from :class:`InfergateError`.
DICOM status codes are not known here: the network edge (``infergate.dicom``)
maps these classes to statuses.
"""

import traceback
from pathlib import Path


class InfergateError(Exception):
    """Base of every error Infergate raises on purpose."""


class ConfigError(InfergateError):
    """The configuration is invalid; the message names the key and the file."""


class StoreError(InfergateError):
    """The state store could not record or read something."""


class StoreUnavailableError(StoreError):
    """The state store cannot be reached now (its database down, restarting or failing
    over): what needs it waits, and goes on once it is back."""


class NotFoundError(StoreError):
    """What an operator asked for (a job, a delivery) is not in the state store."""


class RefusedError(InfergateError):
    """An operator's request cannot be carried out as things stand (retrying a job
    that is not failed, replaying a delivery that is not a dead letter); the message
    says why."""


class OpsClientError(InfergateError):
    """A command could not get an answer from the running gateway's ops endpoint."""


class SpoolError(InfergateError):
    """An instance could not be written durably to the spool."""


class SpoolFullError(SpoolError):
    """The spool has no room for the instance (disk full or over the threshold)."""


class ListenerError(InfergateError):
    """The DICOM listener could not bind its port, or a listener process not start."""


class TlsRefusedError(InfergateError):
    """A client on the TLS port was refused during the handshake; the message says why."""

    def __init__(self, reason: str, *, peer_closed: bool = False) -> None:
        super().__init__(reason)
        # The client went away before the handshake (a health check), not an attack.
        self.peer_closed = peer_closed


class AssociationError(InfergateError):
    """A peer broke the DICOM upper layer protocol, went silent or went away; its
    association ends (with an A-ABORT where the connection is still there)."""


class PduTooLargeError(AssociationError):
    """A peer declared a PDU longer than the listener accepts."""

    def __init__(self, pdu_type: int, declared: int, limit: int) -> None:
        super().__init__(f"PDU of type 0x{pdu_type:02X} declares {declared} bytes, over {limit}")
        self.pdu_type = pdu_type
        self.declared = declared
        self.limit = limit


class InstanceTooLargeError(InfergateError):
    """A received instance would need more resources than the configured bounds allow."""


class InvalidInstanceError(InfergateError):
    """A received instance lacks what Infergate needs to store or process it."""


class PluginError(InfergateError):
    """A plugin is missing, invalid, or failed in its own code."""


class VolumeError(InfergateError):
    """A series cannot be turned into a consistent volume."""


class InferenceError(InfergateError):
    """Triton refused, failed or timed out on a request."""


class TritonUnavailableError(InferenceError):
    """Triton could not be reached or is not ready."""


class SharedMemoryUnavailableError(InferenceError):
    """System shared memory cannot be used with this Triton (another host, a container
    without the host's /dev/shm, /dev/shm too small); requests fall back to gRPC."""


class InferenceTimeoutError(InferenceError):
    """Triton gave no answer within the plugin's deadline: the job fails, it is not retried."""


class ModelMismatchError(InferenceError):
    """A Triton model is missing or does not match the plugin's spec."""


class JobStepError(InfergateError):
    """A step of a job raised something no one expected (a header that is not what its
    VR says, a bug): the job fails, naming the step, the exception and where it was
    raised, but not its message, which may quote the data."""


class JobProcessError(InfergateError):
    """A job run in a process of its own failed there, or its process died.

    ``error`` is the type name of what the job raised (for the log), since the
    exception itself stays in that process."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(reason)
        self.error = error


class ResultEncodingError(InfergateError):
    """A result object could not be built as valid DICOM."""


class ExportError(InfergateError):
    """A result could not be delivered to its destination."""


class UIDMismatchError(InvalidInstanceError):
    """The dataset's SOP Instance UID is not the one the C-STORE request announced."""


def unexpected(exc: BaseException) -> str:
    """An exception no one raised on purpose, for the log and the job record: its type
    and the place it was raised, not its message, which may quote header values."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    parts = Path(last.filename).parts
    # From the package down: site-packages/pydicom/valuerep.py, not the whole path.
    for anchor in ("site-packages", "server", "plugins"):
        if anchor in parts:
            parts = parts[parts.index(anchor) + 1 :]
            break
    return f"{type(exc).__name__} raised in {'/'.join(parts[-3:])}:{last.lineno} ({last.name})"
