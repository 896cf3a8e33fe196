#!/usr/bin/env bash
# The front door.
#   ./run.sh [run] [FLAGS]   set up .venv (first time only) and run the main job: a short UL2
#                            adaptation of a tiny Gemma 3 (made here, random) on the embedded
#                            corpus; FLAGS go to launch.train. Run again: it resumes (rm -r
#                            workdir/tiny to start over)
#   ./run.sh test [ARGS]     set up .venv with the test extra, lint (ruff check) and run pytest
#                            (ARGS go to pytest)
# Needs only Python 3.11 and pip. PYTHON=... picks the interpreter, VENV=... the environment.
# The package (pyproject.toml) is installed editable, with requirements-lock.txt as constraints.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

setup() {  # $1: the package and its extras, e.g. ".[test]"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  local stamp="$VENV/.installed-$(echo "$1" |
    cat - pyproject.toml requirements.txt requirements-lock.txt | sha1sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$1" -c requirements-lock.txt
    touch "$stamp"
  fi
}

mode=run
case "${1:-}" in run|test) mode=$1; shift ;; esac
case "$mode" in
  run)
    setup .
    gemma3=workdir/tiny_gemma3
    [ -f "$gemma3/config.json" ] ||
      "$VENV/bin/python" -m launch.make_gemma3 --config configs/tiny.py --out "$gemma3"
    exec "$VENV/bin/python" -m launch.train --config configs/tiny.py --workdir workdir/tiny \
      --config.init.from_gemma3="$gemma3" "$@" ;;
  test)
    setup ".[test]"
    "$VENV/bin/ruff" check --quiet .
    exec "$VENV/bin/python" -m pytest "$@" ;;
esac
