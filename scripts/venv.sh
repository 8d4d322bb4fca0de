#!/usr/bin/env bash
# Create (or reuse) .venv with a Python >= 3.12 and install spendtap into it.
# Usage: scripts/venv.sh [EXTRAS]   e.g. scripts/venv.sh test
# mitmproxy 12 needs Python >= 3.12; under 3.11 pip would silently pick mitmproxy 11.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"

runs() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local c
  for c in "${SPENDTAP_PYTHON:-}" python3.13 python3.12 python3; do
    [ -n "$c" ] && runs "$c" && { echo "$c"; return 0; }
  done
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/3.1[2-9]*/bin/python3; do
      [ -x "$c" ] && runs "$c" && { echo "$c"; return 0; }
    done
  fi
  return 1
}

if [ -x .venv/bin/python ] && runs .venv/bin/python; then
  py=.venv/bin/python
else
  base=$(find_python) || {
    echo "error: spendtap needs Python >= 3.12 (mitmproxy 12); none found." >&2
    echo "       tried python3.13, python3.12, python3 and \$(pyenv root)/versions/3.1[2-9]*." >&2
    echo "       Install one, or point SPENDTAP_PYTHON at it." >&2
    exit 1
  }
  rm -rf .venv
  "$base" -m venv .venv
  py=.venv/bin/python
fi

stamp=.venv/.spendtap-installed-$extras
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$py" -m pip install --quiet --disable-pip-version-check --upgrade pip
  # setuptools notes that an editable install maps addon/ to the spendtap package
  # (information only, a screen of it): that mapping is deliberate, see pyproject.toml.
  PYTHONWARNINGS="ignore:Editable installation" \
    "$py" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
  touch "$stamp"
fi
