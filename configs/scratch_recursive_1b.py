"""Pretraining a recursive Llama-style model from scratch (no source checkpoint): ~1B parameters,
24 layers of width 2048 computed as 12 shared layers x 2 loops (so ~0.6B unique parameters), random init.

    python launch/tpu_pod.py --tpu my-v5e-256 --zone us-west4-a --config configs/scratch_recursive_1b.py \
        --workdir gs://bucket/rrt/scratch1b -- --config.tokenizer=/path/to/hf_tokenizer_dir --config.data.data_dir=gs://...

Check it fits first: python -m rrt.aot --config configs/scratch_recursive_1b.py --topology v5e-256

Measured with rrt.aot on v5e-256 (v5e:16x16, mesh data 1 x fsdp 256 x tensor 1, gather_shared off as inherited from
recursive_gemma_1b, 2026-12-03): fits with 2.99 GiB of 16 GiB per chip; 13,683 MiB of all-gather per chip per step.
Cost: 8.09e9 training FLOPs per token (rrt/flops.py, as rrt.aot prints it); 20B tokens are 1.6e20 FLOPs, 0.84 s per
step and about 2.2 hours at 40% MFU (197 TFLOP/s bf16 per chip; XLA's cost model gives no step time here).
"""

from ml_collections import config_dict

from rrt import config


def get_config():
    c = config.preset("recursive_gemma_1b")
    c.source = ""  # from scratch
    c.arch = None
    c.tokenizer = config_dict.placeholder(str)  # a tokenizer source (HF dir with tokenizer.json, .gguf, rrt dir)
    c.model.vocab_size = 32000
    c.model.d_model = 2048
    c.model.n_layers = 24
    c.model.n_heads = 16
    c.model.n_kv_heads = 4
    c.model.head_dim = 128
    c.model.d_ff = 5632
    c.model.rope_theta = 10000.0
    c.recursion.init = "random"
    c.steps = 9540  # 20B tokens of 1024 x 2048
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 1000
    return c
