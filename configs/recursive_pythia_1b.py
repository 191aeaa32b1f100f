"""Recursive Pythia 1B: 16 layers as 8 shared x 2 loops, CYCLE, Stepwise (GPT-NeoX: parallel residual).

    python launch/tpu_pod.py --tpu my-v4-64 --zone us-central2-b --config configs/recursive_pythia_1b.py \
        --workdir gs://bucket/rrt/pythia1b -- --config.source=/path/to/pythia-1b --config.data.data_dir=gs://...

Cost: 15B tokens at ~1.2e10 training FLOPs per token ~ 1.8e20 FLOPs: ~2 days on a v4-64 at 40% MFU.
"""

from ml_collections import config_dict

from rrt import archs, config


def get_config():
    c = config.preset("recursive_gemma_1b")
    c.source = config_dict.placeholder(str)  # a Hugging Face EleutherAI/pythia-1b directory
    c.arch = archs.PYTHIA_1B
    return c
