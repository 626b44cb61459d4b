#!/usr/bin/env bash
# The README's second command: lint, type-check and run the whole test suite.
# Integration tests need DCMTK (storescu, echoscu), Orthanc and dicom3tools (dciodvfy)
# on PATH; .ci/run installs them with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
