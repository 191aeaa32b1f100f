#!/usr/bin/env bash
# Run (or resume) one training run on this machine; rerunning the same command resumes it.
#
#   launch/local.sh [--dry-run] CONFIG WORKDIR [--config.x=y ...]
#
# Runs `python -m rrt.train --config CONFIG --workdir WORKDIR ...` with $PYTHON, else the repository's .venv, else
# python3, and appends its output to WORKDIR/train.log. --dry-run prints the command (shell-quoted) and runs nothing.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage="usage: launch/local.sh [--dry-run] CONFIG WORKDIR [--config.x=y ...]"

dry_run=0
if [[ "${1:-}" == "--dry-run" || "${1:-}" == "--dry_run" ]]; then
  dry_run=1
  shift
fi
if (( $# < 2 )); then
  echo "$usage" >&2
  exit 2
fi
config="$1"
workdir="$2"
shift 2
name="${config%%:*}"
if [[ "$name" != */* && "$name" != *.py && -f "$repo/configs/$name.py" ]]; then
  :  # a preset name (rrt.train resolves it)
elif [[ "$config" != *.py && "$config" != *.py:* ]]; then
  echo "error: CONFIG must be a preset name (configs/<name>.py without the path) or a Python config file," \
    "got '$config'" >&2
  echo "$usage" >&2
  exit 2
elif [[ ! -f "${config%%:*}" ]]; then
  echo "error: unknown config file '${config%%:*}' (relative to $PWD)" >&2
  exit 2
fi

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
cmd=("$python" -m rrt.train --config "$config" --workdir "$workdir" "$@")

# Python's shlex.quote, so every launcher prints commands the same way.
quote() {
  local LC_ALL=C sq="'" esc="'\"'\"'"
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//$sq/$esc}"; fi
}
if (( dry_run )); then
  line=""
  for arg in "${cmd[@]}"; do line+="${line:+ }$(quote "$arg")"; done
  printf '%s\n' "$line"
  exit 0
fi

# rrt is importable even when the package is not installed into the environment.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ "$workdir" != *://* ]]; then
  mkdir -p "$workdir"
  exec > >(tee -a "$workdir/train.log") 2>&1
fi
# exec: signals (Ctrl-C, a sweep's SIGTERM) reach training directly, so it can checkpoint.
exec "${cmd[@]}"
