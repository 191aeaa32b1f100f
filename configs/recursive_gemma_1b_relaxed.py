"""Relaxed Recursive Gemma 1B: the 9 x 2 model with rank-512 layer-wise LoRA, Average init (the paper's best).

    python launch/tpu_pod.py --tpu my-v5e-256 --zone us-west4-a --config configs/recursive_gemma_1b_relaxed.py \
        --workdir /mnt/rrt/runs/gemma1b_r512 -- --config.source=/path/to/gemma-2b --config.data.data_dir=gs://...

Measured with `python -m rrt.aot --config recursive_gemma_1b_relaxed --topology v5e-256` (v5e:16x16, mesh 1 x 256 x
1, grad_accum 4, gather_shared off as inherited): as set here (remat full, the loss in chunks of 1024 positions) it
fits, with 15.89 GiB of 16 GiB per chip (0.11 GiB headroom: parameters 1.86, optimizer state 3.72, temporaries
10.23); compile 150 s on 2 CPU cores. With the parent's remat "dots" and no chunking it does not (21.72 GiB of
temporaries, measured with gather_shared on), nor with remat full + chunking and gather_shared on (18.84 GiB, the
largest buffers two unsharded float32 [256000, 2048] embedding gradients). Cost: rrt/flops.py gives 1.96e10 FLOP per
token, 2.04 s per step and 4.0 h for its steps at 40% MFU. The headroom is thin: check with rrt.aot after any change.
"""

from rrt import config


def get_config():
    c = config.preset("recursive_gemma_1b")
    c.recursion.init = "average"
    c.recursion.rank_attn = 512
    c.recursion.rank_mlp = 512
    c.optim.lora_lr = 3e-4
    c.remat = "full"  # with the chunked loss, what fits on v5e-256 (rrt.aot; see the docstring)
    c.loss.chunk_tokens = 1024
    return c
