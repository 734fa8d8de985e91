#!/usr/bin/env bash
# One command: the same set-up as webui.sh plus test packages and Debian chromium, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
[ -x venv/bin/python ] || "$PYTHON" -m venv venv
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
venv/bin/python install.py --tests
exec venv/bin/python -m pytest "$@"
