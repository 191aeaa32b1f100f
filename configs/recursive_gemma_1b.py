"""Recursive Gemma 1B (the paper's main model): Gemma-2B's 18 layers as 9 shared x 2 loops, CYCLE, Stepwise.

    python launch/tpu_pod.py --tpu my-v5e-256 --zone us-west4-a --config configs/recursive_gemma_1b.py \
        --workdir gs://bucket/rrt/gemma1b -- --config.source=/path/to/gemma-2b --config.data.data_dir=gs://bucket/tfds

Cost: the paper's 15B tokens are 15e9 / (1024 x 2048) ~ 7,150 steps of a 1024 x 2048 batch; the recursive model
does the full 18-layer compute, ~2.0e10 FLOPs per token for training, ~3.0e20 FLOPs in all: about 22 hours on a
v5e-256 at 40% MFU. Strict recursion (rank 0); see recursive_gemma_1b_relaxed.py for rank 512.
"""

from ml_collections import config_dict

from rrt import archs, config


def get_config():
    c = config.get_config()
    c.source = config_dict.placeholder(str)  # a Hugging Face google/gemma-2b directory (config.json + safetensors)
    c.arch = archs.GEMMA_2B  # for shape checks only; the checkpoint's config.json wins
    c.recursion.loops = 2
    c.recursion.strategy = "cycle"
    c.recursion.init = "stepwise"
    c.data.sources = [dict(kind="tfds", name="slim_pajama", split="train", text_field="text")]
    c.data.data_dir = config_dict.placeholder(str)  # TFDS data_dir (prepare with python -m rrt.data.tfds)
    c.data.seq_len = 2048
    c.data.global_batch_size = 1024
    c.steps = 7150
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 200
    c.optim.schedule = "wsd"
    c.dtype = "bfloat16"
    c.remat = "dots"
    c.mesh = (1, -1, 1)  # FSDP over the whole slice
    c.checkpoint_every = 250
    c.eval_every = 500
    c.eval.heldout = ""
    c.eval.tasks = "lambada,hellaswag,piqa,winogrande,arc_easy,arc_challenge,openbookqa"
    c.eval.limit = 500
    return c
