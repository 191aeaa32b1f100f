#!/usr/bin/env bash
# The README demo: set up, then convert SmolLM2-135M into a relaxed recursive 15 x 2 model, uptrain it briefly,
# evaluate original / converted / uptrained, print the table and save plots under runs/demo (rerun to resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m rrt.demo "$@"
