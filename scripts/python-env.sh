#!/usr/bin/env bash
# Creates .venv with training/requirements.txt (idempotent: skipped when the requirements did
# not change since the last install). Installs python3-venv with apt-get when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=training/requirements.txt
stamp=.venv/.requirements.sha256
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo ".venv is up to date"
  exit 0
fi
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "python3 -m venv is unavailable: install python3-venv" >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
echo "$want" > "$stamp"
echo ".venv ready: $(.venv/bin/python -c 'import onnxruntime, sklearn, numpy; print("onnxruntime", onnxruntime.__version__, "scikit-learn", sklearn.__version__, "numpy", numpy.__version__)')"
