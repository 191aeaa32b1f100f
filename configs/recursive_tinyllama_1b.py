"""Recursive TinyLlama 1.1B: 22 layers as 11 shared x 2 loops, CYCLE, Stepwise.

    python launch/slurm.py --nodes 4 --gpus_per_node 8 --partition gpu --time 24:00:00 \
        --config configs/recursive_tinyllama_1b.py --workdir /shared/rrt/tinyllama -- \
        --config.source=/models/TinyLlama-1.1B --config.data.data_dir=/shared/tfds --submit

Cost: 15B tokens at ~1.3e10 training FLOPs per token ~ 2.0e20 FLOPs: ~16 hours on 32 H100s at 40% MFU.
"""

from ml_collections import config_dict

from rrt import archs, config


def get_config():
    c = config.preset("recursive_gemma_1b")
    c.source = config_dict.placeholder(str)  # a Hugging Face TinyLlama directory
    c.arch = archs.TINYLLAMA_1B
    return c
