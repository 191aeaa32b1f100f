#!/usr/bin/env bash
# The README demo: set up, then convert SmolLM2-135M into a relaxed recursive 15 x 2 model, uptrain it briefly,
# evaluate original / converted / uptrained, print the table and save plots under runs/demo (rerun to resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# The venv holds libtpu (for ahead-of-time TPU compiles, rrt.aot); on a machine with no TPU and no GPU, JAX would
# probe it at start-up and print TPU warnings. There, run on the CPU unless JAX_PLATFORMS says otherwise.
if [ -z "${JAX_PLATFORMS:-}" ] && ! ls /dev/accel* /dev/vfio/[0-9]* > /dev/null 2>&1 && ! command -v nvidia-smi > /dev/null; then
  export JAX_PLATFORMS=cpu
fi
exec .venv/bin/python -m rrt.demo "$@"
