"""Relaxed Recursive Gemma 1B: the 9 x 2 model with rank-512 layer-wise LoRA, Average init (the paper's best).

    python launch/tpu_pod.py --tpu my-v5e-256 --zone us-west4-a --config configs/recursive_gemma_1b_relaxed.py \
        --workdir gs://bucket/rrt/gemma1b_r512 -- --config.source=/path/to/gemma-2b --config.data.data_dir=gs://...

Cost: as recursive_gemma_1b.py plus the LoRA matmuls (~10% more FLOPs at rank 512): about a day on a v5e-256.
"""

from rrt import config


def get_config():
    c = config.preset("recursive_gemma_1b")
    c.recursion.init = "average"
    c.recursion.rank_attn = 512
    c.recursion.rank_mlp = 512
    c.optim.lora_lr = 3e-4
    return c
