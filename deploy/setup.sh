#!/usr/bin/env bash
# Creates .venv with Infergate and its dependencies (the embedded tritonserver included).
# Pass "test" to add the test tools. Runs pip only when .venv is missing or
# pyproject.toml changed since the last install (the code itself is installed
# editable: a changed module needs no reinstall), so a second start works offline and
# at once. pip's and setuptools' chatter goes to .venv/setup.log, shown if pip fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "Infergate needs Python 3.11 (found $("$python" --version 2>&1)); set PYTHON=..." >&2
    exit 1
fi
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
stamp=.venv/.infergate-installed
project=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/infergate ] && [ -f "$stamp" ]; then
    read -r installed installed_extras < "$stamp" || true
    # An install with the test tools serves too.
    if [ "$installed" = "$project" ] && { [ -z "$extras" ] || [ "${installed_extras:-}" = "[test]" ]; }; then
        exit 0
    fi
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
echo "setting up .venv: pip install (the first time, a few hundred MB of wheels," \
    "tritonserver's among them; about 780 MB installed with the test tools)" >&2
log=.venv/setup.log
if ! {
    .venv/bin/python -m pip install --quiet --upgrade pip &&
        .venv/bin/python -m pip install --quiet --editable ".${extras}" &&
        .venv/bin/python -m pip check
} > "$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "setup failed; the whole pip output is in $log" >&2
    exit 1
fi
echo "$project ${extras}" > "$stamp"
