"""Where pynetdicom writes received datasets: files in the spool's ``tmp/``, hashed as
they are written, and tracked per association.

With STORE_RECV_CHUNKED_DATASET, pynetdicom 3.0 writes each C-STORE dataset to a
NamedTemporaryFile (preamble and file meta first, then the fragments as the P-DATA
arrive), keeps it open while the handler runs, and unlinks it afterwards, ignoring a
file that is gone. Created in the spool's ``tmp/``, the handler adopts it by rename
on the same file system instead of copying it. Two things pynetdicom does not do are
done here: the SHA-256 that duplicate detection needs is computed from the bytes as
they pass (no second read of the file), and the file of an association that ends in
the middle of a dataset is removed when the association closes, not at the next start.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
import weakref
from pathlib import Path
from typing import IO, Any

from pynetdicom import _config, dimse_messages


class _HashingFile:
    """pynetdicom's temporary file, with a running SHA-256 of what is written to it."""

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped
        self.digest = hashlib.sha256()
        self.name: str = wrapped.name
        self.file: IO[bytes] = wrapped.file

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        written: int = self._wrapped.write(data)
        return written

    def close(self) -> None:
        self._wrapped.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class IncomingFiles:
    """The files pynetdicom is writing, by path, and which association each belongs to."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._files: dict[str, _HashingFile] = {}
        self._by_association: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()

    def install(self) -> None:
        """Have pynetdicom stream every received dataset into a file made here."""
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom has no setting for the file; its module-level name is the seam.
        setattr(  # noqa: B010 - the name is not exported, so mypy rejects plain assignment
            dimse_messages, "NamedTemporaryFile", self._create
        )

    def _create(self, **kwargs: Any) -> _HashingFile:
        created = _HashingFile(tempfile.NamedTemporaryFile(dir=self.directory, **kwargs))  # noqa: SIM115 - pynetdicom closes it
        # pynetdicom decodes P-DATA in the association's DUL thread, which knows its association.
        association = getattr(threading.current_thread(), "assoc", None)
        with self._lock:
            self._files[created.name] = created
            if association is not None:
                self._by_association.setdefault(association, set()).add(created.name)
        return created

    def sha256(self, path: Path) -> str:
        """The SHA-256 of the file at ``path``, from the bytes as they were written when
        they passed through here (the file is no longer tracked after this)."""
        with self._lock:
            created = self._files.pop(str(path), None)
        if created is not None:
            return created.digest.hexdigest()
        with path.open("rb") as handle:  # written by someone else: read it
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def forget(self, association: Any) -> int:
        """Remove the files ``association`` left unclaimed (a dataset cut off, or refused);
        returns how many were still on disk."""
        with self._lock:
            names = self._by_association.pop(association, set())
            for name in names:
                self._files.pop(name, None)
        removed = 0
        for name in names:
            path = Path(name)
            if path.exists():
                path.unlink(missing_ok=True)
                removed += 1
        return removed
