#!/usr/bin/env bash
# Run the whole test suite (creates or reuses .venv first). Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec "$PY" -m pytest "$@"
