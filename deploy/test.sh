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
# Every Triton model is a module named "model": one mypy run each, the same settings.
for model in model_repository/*/1/model.py; do
    .venv/bin/mypy "$model"
done
# On every core (pytest-xdist), at most four: most integration tests wait on peers and
# quiet periods, so two run side by side in about the time of one.
exec .venv/bin/pytest --numprocesses=auto --maxprocesses=4 "$@"
