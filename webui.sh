#!/usr/bin/env bash
# One command: create the venv, install pinned packages, build the embedded tiny models, start the UI.
# Any extra arguments go to webui.py (e.g. --port 7861, --ckpt path, --lora-dir dir).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
[ -x venv/bin/python ] || "$PYTHON" -m venv venv
data_dir=.
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" = "--data-dir" ] && data_dir="${args[$((i + 1))]}"
done
venv/bin/python install.py --data-dir "$data_dir"
exec venv/bin/python webui.py "$@"
