#!/usr/bin/env bash
# Installs headless Chromium (Debian packages) for the browser tests, if
# missing. Playwright drives it with executable_path=/usr/bin/chromium (or
# $PRELABEL_CHROMIUM); it never downloads a browser of its own. Without a
# Chromium the browser tests skip with this hint.
set -euo pipefail
if [ -x "${PRELABEL_CHROMIUM:-/usr/bin/chromium}" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "[setup] /usr/bin/chromium is missing and there is no apt-get:" \
        "install Chromium and set PRELABEL_CHROMIUM to its path; the" \
        "browser tests are skipped until then" >&2
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
