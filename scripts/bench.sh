#!/usr/bin/env bash
# Benchmarks: set up (as scripts/run does) and run scripts/bench/run.py, which compares mpd
# with the baselines side by side. Extra arguments go to run.py, e.g.
#   scripts/bench.sh --quick                 # smoke test, well under a minute
#   scripts/bench.sh --scenarios ping,handoff
# Results: bench-results/ (git-ignored). See BENCHMARKS.md. Env: VENV as for scripts/setup;
# TOOLS_VENV (default bench-results/tools-venv, made with $PYTHON as .venv is) gets uvloop for the uvloop baseline, which is
# a benchmark's tool, not a dependency of mpd: where it cannot be installed, run.py skips
# that baseline and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup >/dev/null
TOOLS_VENV=${TOOLS_VENV:-bench-results/tools-venv}
if ! "$TOOLS_VENV/bin/python" -c "import uvloop" 2>/dev/null; then
    { "${PYTHON:-python3}" -m venv "$TOOLS_VENV" && "$TOOLS_VENV/bin/python" -m pip install --quiet uvloop; } \
        >/dev/null 2>&1 || echo "bench.sh: could not install uvloop into $TOOLS_VENV" >&2
fi
uvloop=()
if "$TOOLS_VENV/bin/python" -c "import uvloop" 2>/dev/null; then
    uvloop=(--uvloop-python "$TOOLS_VENV/bin/python")
fi
exec "${VENV:-.venv}/bin/python" scripts/bench/run.py ${uvloop[@]+"${uvloop[@]}"} "$@"
