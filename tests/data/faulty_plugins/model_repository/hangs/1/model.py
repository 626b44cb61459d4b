"""A model that never answers (Triton Python backend): each request holds its instance
for an hour, as a deadlocked or runaway model would, then fails."""

from __future__ import annotations

import time
from typing import Any

HANG_S = 3600.0


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self._pb: Any = pb_utils

    def execute(self, requests: list[object]) -> list[object]:
        time.sleep(HANG_S)
        error = self._pb.TritonError("the hangs model woke up")
        return [self._pb.InferenceResponse(error=error) for _ in requests]
