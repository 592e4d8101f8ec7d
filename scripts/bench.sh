#!/usr/bin/env bash
# Benchmarks: set up (as scripts/run does) and run scripts/bench/run.py, which compares mpd
# with the baselines side by side. Extra arguments go to run.py, e.g.
#   scripts/bench.sh --quick                 # smoke test, well under a minute
#   scripts/bench.sh --scenarios ping,handoff
# Results: bench-results/ (git-ignored). See BENCHMARKS.md. Env: VENV as for scripts/setup.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup >/dev/null
exec "${VENV:-.venv}/bin/python" scripts/bench/run.py "$@"
