"""Recursive Llama 3.2 1B: Llama-3.2-1B's 16 layers as 8 shared x 2 loops, CYCLE, Stepwise (as the paper).

    python launch/tpu_pod.py --tpu my-v5e-256 --zone us-west4-a --config configs/recursive_llama32_1b.py \
        --workdir gs://bucket/rrt/llama32_1b -- --config.source=/path/to/Llama-3.2-1B --config.data.data_dir=gs://...

`config.source` is a placeholder: training refuses to start until it names the checkpoint (a Hugging Face
meta-llama/Llama-3.2-1B directory, or its GGUF). Check it fits first (docs/LAUNCHING.md):

    python -m rrt.aot --config configs/recursive_llama32_1b.py --topology v5e-256 --output aot.json

Measured with rrt.aot on v5e-256 (v5e:16x16, mesh data 1 x fsdp 256 x tensor 1, 1024 x 2048, remat dots,
gather_shared off, all from recursive_gemma_1b): grad_accum 2 (two sequences per chip per micro-batch) fits with
10.53 GiB of 16 GiB per chip (5.47 GiB headroom) and executes 212 all-gathers of 8,157 MiB per chip per step;
grad_accum 4 (as recursive_gemma_1b) fits with 6.14 GiB but gathers 16,307 MiB per step, so 2 is set. Compile
172 s. Cost: rrt/flops.py gives 8.22e9 training FLOPs per token, 1.72e16 per step: 0.85 s per step and 1.7 hours
for the 7,150 steps (15B tokens) at 40% MFU (197 TFLOP/s bf16 per chip); XLA's cost analysis counts each loop body
once, so its 1.24e9 FLOP/token is a floor, not a total.
"""

from ml_collections import config_dict

from rrt import archs, config


def get_config():
    c = config.preset("recursive_gemma_1b")  # the paper's recipe: 15B tokens of 1024 x 2048, FSDP, bf16, remat dots
    c.source = config_dict.placeholder(str)  # a Hugging Face meta-llama/Llama-3.2-1B directory (or its .gguf)
    c.arch = archs.LLAMA_3_2_1B  # for shape checks only; the checkpoint's config.json wins
    c.grad_accum = 2  # rrt.aot, v5e-256: 10.53 of 16 GiB per chip, half grad_accum 4's all-gather traffic
    return c
