"""A tiny recursive model for tests and smoke runs: trains from scratch on TinyStories in seconds on a CPU.

    python -m rrt.train --config configs/tiny.py --workdir /tmp/rrt_tiny

Cost: ~20 s on 2 CPU cores (most of it compilation). Uses the SmolLM2 tokenizer (49,152 tokens).
"""

from rrt import config


def get_config():
    c = config.get_config()
    c.source = ""  # from scratch
    c.arch = None
    c.tokenizer = "smollm2"
    c.model.d_model = 64
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.head_dim = 16
    c.model.d_ff = 128
    c.recursion.loops = 2
    c.recursion.rank_attn = 4
    c.recursion.rank_mlp = 4
    c.data.sources = [
        dict(kind="files", glob=f"{config.shared_data()}/corpora/tinystories_val.txt", heldout_fraction=0.1)
    ]
    c.data.seq_len = 64
    c.data.global_batch_size = 8
    c.steps = 20
    c.optim.warmup_steps = 5
    c.optim.lr = 1e-3
    c.checkpoint_every = 5
    c.log_every = 1
    c.eval.heldout = "tinystories_val"
    c.eval.seq_len = 64
    c.eval.max_windows = 4
    c.async_checkpoint = False
    return c
