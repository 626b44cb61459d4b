#!/usr/bin/env bash
# The README's first command: set up (deploy/setup.sh) and start `infergate serve`
# on the embedded defaults, or with the settings file given as --config PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/infergate serve "$@"
