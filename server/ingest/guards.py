"""A guard against what pydicom's defaults leave open: a bound on how far a Deflated
dataset may inflate, checked as a stream. (Read timeouts and PDU length caps are in
``upper_layer``.)"""

from __future__ import annotations

import zlib
from pathlib import Path

from infergate.errors import InstanceTooLargeError, InvalidInstanceError
from infergate.ingest.incoming import HEAD_BYTES, dataset_offset

_CHUNK = 1 << 16


def check_inflated_size(path: Path, limit: int) -> None:
    """Inflate a Deflated Explicit VR dataset as a stream and refuse it past ``limit``.

    pydicom inflates a deflated dataset whole, in memory, before parsing it; a few
    kilobytes can inflate to gigabytes. This counts the inflated bytes, keeping none.
    The file is as ingest writes it (``incoming``): preamble, prefix, file meta starting
    with its group length, then the deflated dataset.
    """
    with path.open("rb") as handle:
        start = dataset_offset(handle.read(HEAD_BYTES))
        if start is None:
            raise InvalidInstanceError("file meta does not start with its group length")
        handle.seek(start)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := handle.read(_CHUNK):
            pending = chunk
            while pending:
                total += len(inflater.decompress(pending, _CHUNK))
                if total > limit:
                    raise InstanceTooLargeError(
                        f"deflated dataset inflates past ingest.max_inflated_bytes ({limit})"
                    )
                pending = inflater.unconsumed_tail
