#!/usr/bin/env bash
# Experiment 2.1 end to end: set up the environment (first run), start a djinn
# server on 127.0.0.1, run the four baselines, print the table, write results.
# Options: scripts/run_exp2_1.sh --help
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec "$PY" scripts/exp2_1.py "$@"
