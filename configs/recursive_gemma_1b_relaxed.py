"""Relaxed Recursive Gemma 1B: the 9 x 2 model with rank-512 layer-wise LoRA, Average init (the paper's best).

    python launch/tpu_pod.py --tpu my-v5e-256 --zone us-west4-a --config configs/recursive_gemma_1b_relaxed.py \
        --workdir /mnt/rrt/runs/gemma1b_r512 -- --config.source=/path/to/gemma-2b --config.data.data_dir=gs://...

Does NOT fit on a v5e-256 as set (measured with `python -m rrt.aot --config recursive_gemma_1b_relaxed --topology
v5e-256`): 21.72 GiB of temporaries per chip against 15.75 GiB usable (parameters 1.86 GiB, optimizer state 3.72 GiB
per chip). Not yet tried: grad_accum 8 or remat "full". Check with rrt.aot before launching.
"""

from rrt import config


def get_config():
    c = config.preset("recursive_gemma_1b")
    c.recursion.init = "average"
    c.recursion.rank_attn = 512
    c.recursion.rank_mlp = 512
    c.optim.lora_lr = 3e-4
    return c
