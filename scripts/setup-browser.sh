#!/usr/bin/env bash
# Installs headless Chromium (Debian packages) for the browser tests, if
# missing. Playwright drives it with executable_path=/usr/bin/chromium; it
# never downloads a browser of its own.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ] && ! command -v sudo >/dev/null; then
    echo "[setup] /usr/bin/chromium is missing and we are not root:" \
        "install the Debian packages chromium and chromium-driver" >&2
    exit 0
fi
SUDO=""
[ "$(id -u)" != "0" ] && SUDO="sudo"
echo "[setup] installing chromium (Debian packages) for the browser tests"
$SUDO apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    chromium chromium-driver fonts-dejavu-core >/dev/null
