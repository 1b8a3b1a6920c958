# Sourced by the repo's scripts: create or reuse .venv and install the pinned
# requirements into it. Re-installs only when requirements/lock.txt or
# pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DJINN_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON_BIN" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
        echo "djinn needs Python >= 3.10; set PYTHON=/path/to/python3.x" >&2
        exit 1
    }
    echo "creating virtual environment in $VENV" >&2
    "$PYTHON_BIN" -m venv "$VENV"
fi

stamp="$VENV/.djinn-installed"
want="$(cat "$ROOT/requirements/lock.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing pinned requirements into $VENV (first run takes a few minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ROOT/requirements/lock.txt"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$ROOT"
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
PY="$VENV/bin/python"
