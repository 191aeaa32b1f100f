"""Recursive Pythia 1B: 16 layers as 8 shared x 2 loops, CYCLE, Stepwise (GPT-NeoX: parallel residual).

    python launch/tpu_pod.py --tpu my-v4-64 --zone us-central2-b --config configs/recursive_pythia_1b.py \
        --workdir gs://bucket/rrt/pythia1b -- --config.source=/path/to/pythia-1b --config.data.data_dir=gs://...

Measured with `python -m rrt.aot --config configs/recursive_pythia_1b.py --topology v4-64` (v4:2x4x4, 32 chips,
mesh data 1 x fsdp 32 x tensor 1, 1024 x 2048, grad_accum 4 and remat dots from recursive_gemma_1b): fits with
22.31 GiB of 32 GiB per chip (9.69 GiB headroom). Cost (rrt/flops.py): 6.26e9 training FLOPs per token, 1.31e16 per
step: 3.73 s per step and 7.4 hours for the 7,150 steps (15B tokens) at 40% MFU (275 TFLOP/s bf16 per chip).
"""

from ml_collections import config_dict

from rrt import archs, config


def get_config():
    c = config.preset("recursive_gemma_1b")
    c.source = config_dict.placeholder(str)  # a Hugging Face EleutherAI/pythia-1b directory
    c.arch = archs.PYTHIA_1B
    return c
