#!/usr/bin/env bash
# Rewrites deploy/docker/constraints.txt from .venv (after `bash deploy/setup.sh test`
# and a green suite): the image installs exactly what the tests ran with.
set -euo pipefail
cd "$(dirname "$0")/../.."
{
    echo "# Every package the image installs, at the version the suite ran with on this"
    echo "# project's machines (pip freeze of .venv; regenerate with deploy/docker/freeze.sh)."
    .venv/bin/pip freeze --exclude-editable | grep -v -E "^(-e|infergate)"
} > deploy/docker/constraints.txt
