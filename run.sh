#!/usr/bin/env bash
# The front door.
#   ./run.sh                 set up .venv (first time only) and run the main job
#   ./run.sh test [ARGS]     set up .venv with test extras and run pytest (ARGS go to pytest)
# Needs only Python 3.11 and pip. PYTHON=... picks the interpreter, VENV=... the environment.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

setup() {  # $@: requirement files
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  local stamp="$VENV/.installed-$(cat "$@" requirements-lock.txt | sha1sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    local reqs=()
    for f in "$@"; do reqs+=(-r "$f"); done
    "$VENV/bin/python" -m pip install -q "${reqs[@]}" -c requirements-lock.txt
    touch "$stamp"
  fi
}

mode=${1:-run}
[ $# -gt 0 ] && shift
case "$mode" in
  run)
    setup requirements.txt
    exec "$VENV/bin/python" -m launch.train --config configs/tiny.py --workdir workdir/tiny "$@" ;;
  test)
    setup requirements.txt requirements-test.txt
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *)
    echo "usage: ./run.sh [run|test] [args...]" >&2; exit 2 ;;
esac
