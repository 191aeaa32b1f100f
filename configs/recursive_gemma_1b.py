"""Recursive Gemma 1B (the paper's main model): Gemma-2B's 18 layers as 9 shared x 2 loops, CYCLE, Stepwise.

    python launch/tpu_pod.py --tpu my-v5e-256 --zone us-west4-a --config configs/recursive_gemma_1b.py \
        --workdir gs://bucket/rrt/gemma1b -- --config.source=/path/to/gemma-2b --config.data.data_dir=gs://bucket/tfds

Check it fits first (compiles the real step for the slice on any CPU with libtpu; docs/LAUNCHING.md):

    python -m rrt.aot --config configs/recursive_gemma_1b.py --topology v5e-256 --output aot.json

Measured with rrt.aot on v5e-256 (v5e:16x16, mesh data 1 x fsdp 256 x tensor 1, remat dots): grad_accum 4 (one
sequence per chip per micro-batch) fits with 11.82 GiB of 16 GiB per chip as set (gather_shared off; 14.79 GiB with
it on, mostly the 256k-vocabulary logits in XLA's temporaries); without grad_accum (4 sequences per chip) XLA
refuses the program (28.45 GiB of temporaries). All-gather per chip per step (rrt.aot's loop-weighted count): 35,659
MiB with gather_shared off, 229,902 MiB with it on, hence off. Cost: the paper's 15B tokens are ~7,150 steps of 1024
x 2048; rrt/flops.py gives 1.59e10 training FLOPs per token, 3.34e16 per step: 1.66 s per step and 3.3 hours at 40%
MFU (197 TFLOP/s bf16 per chip). XLA's own cost analysis counts each loop body once (grad_accum and layer scans), so
its 1.23e9 FLOP/token is a floor, not a total, and its cost model gives no step time for this program. Strict
recursion (rank 0); see recursive_gemma_1b_relaxed.py for rank 512.
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
    c.grad_accum = 4  # 1 sequence per chip per micro-batch on v5e-256; 4 at once exceed 16 GiB (rrt.aot)
    c.steps = 7150
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 200
    c.optim.schedule = "wsd"
    c.dtype = "bfloat16"
    c.remat = "dots"
    c.mesh = (1, -1, 1)  # FSDP over the whole slice
    # rrt.aot, v5e-256: gather_shared ON executes 229,902 MiB of all-gather per chip per step (XLA still gathers
    # inside the micro-batch and layer loops), OFF 35,659 MiB and 3 GiB less HBM: off for this slice
    c.gather_shared = False
    c.checkpoint_every = 250
    c.eval_every = 500
    c.eval.heldout = ""
    c.eval.tasks = "lambada,hellaswag,piqa,winogrande,arc_easy,arc_challenge,openbookqa"
    c.eval.limit = 500
    return c
