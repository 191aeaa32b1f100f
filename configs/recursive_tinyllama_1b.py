"""Recursive TinyLlama 1.1B: 22 layers as 11 shared x 2 loops, CYCLE, Stepwise.

    python launch/slurm.py --nodes 4 --gpus_per_node 8 --partition gpu --time 24:00:00 \
        --config configs/recursive_tinyllama_1b.py --workdir /shared/rrt/tinyllama -- \
        --config.source=/models/TinyLlama-1.1B --config.data.data_dir=/shared/tfds --submit

Cost: 7.31e9 training FLOPs per token (rrt/flops.py, as rrt.aot prints it); 15B tokens are 1.1e20 FLOPs, about
2.4 hours on 32 H100s at 40% of 989 TFLOP/s (bf16 dense): arithmetic, not a measurement, since rrt.aot compiles for
TPU slices only. The same step compiled for v5e-256 (python -m rrt.aot --config configs/recursive_tinyllama_1b.py
--topology v5e-256, 2026-12-03) fits with 2.81 GiB of 16 GiB per chip, 0.76 s per step at 40% MFU, 1.5 hours.
(The earlier "1.3e10 FLOP/token, 16 hours" was not measured.)
"""

from ml_collections import config_dict

from rrt import archs, config


def get_config():
    c = config.preset("recursive_gemma_1b")
    c.source = config_dict.placeholder(str)  # a Hugging Face TinyLlama directory
    c.arch = archs.TINYLLAMA_1B
    return c
