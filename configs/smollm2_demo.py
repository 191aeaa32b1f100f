"""The README demo: SmolLM2-135M (30 layers) as a relaxed recursive 15 x 2 model, uptrained briefly on CPU.

    python -m rrt.train --config configs/smollm2_demo.py --workdir runs/demo/train
    (or the whole demo, with evaluation, table and plots: bash launch/demo.sh)

Cost: 12 steps of 4 x 256 tokens (12k tokens), ~1 TFLOP each: 1 min 47 s for the 12 on 2 CPU cores (float32,
with the early-exit loss and compilation; 2026-12-08); the whole demo (three evaluations around it) took 6 min 51 s.
"""

from rrt import config


def get_config():
    c = config.get_config()
    c.source = "smollm2"
    c.recursion.loops = 2
    c.recursion.init = "average"  # the paper's best init for relaxed models
    c.recursion.rank_attn = 64
    c.recursion.rank_mlp = 64
    c.loss.exit_weight = 0.1  # early-exit loss after the first loop (paper: 0.1)
    c.data.seq_len = 256
    c.data.global_batch_size = 4
    c.steps = 12
    c.optim.lr = 1e-4
    c.optim.lora_lr = 3e-4
    c.optim.warmup_steps = 2
    c.optim.weight_decay = 0.0
    c.checkpoint_every = 6
    c.log_every = 2
    c.eval.max_windows = 16
    return c
