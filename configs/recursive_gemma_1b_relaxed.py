"""Relaxed Recursive Gemma 1B: the 9 x 2 model with rank-512 layer-wise LoRA, Average init (the paper's best).

    python launch/tpu_pod.py --tpu my-v5e-256 --zone us-west4-a --config configs/recursive_gemma_1b_relaxed.py \
        --workdir /mnt/rrt/runs/gemma1b_r512 -- --config.source=/path/to/gemma-2b --config.data.data_dir=gs://...

Does NOT fit on a v5e-256 as set (measured with `python -m rrt.aot --config recursive_gemma_1b_relaxed --topology
v5e-256`): 21.72 GiB of temporaries per chip against 15.75 GiB usable (parameters 1.86 GiB, optimizer state 3.72 GiB
per chip). With `--config.remat=full --config.loss.chunk_tokens=1024` (and splash attention, auto on TPU) it still
does not: 18.84 GiB per chip in total (compile 903 s on 2 CPU cores), the largest buffers being two unsharded float32
[256000, 2048] embedding-gradient buffers (1.95 GiB each) and the chunked loss's f32 [1, 1024, 256000] softmax
terms (0.98 GiB each); rrt.aot's FLOP count is 1.96e10 per token (4.0 h at 40% MFU if it fit). Not yet tried:
grad_accum 8, a smaller chunk_tokens, or a larger slice. Check with rrt.aot before launching.
"""

from rrt import config


def get_config():
    c = config.preset("recursive_gemma_1b")
    c.recursion.init = "average"
    c.recursion.rank_attn = 512
    c.recursion.rank_mlp = 512
    c.optim.lora_lr = 3e-4
    return c
