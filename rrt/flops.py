"""Model FLOPs per token (for MFU) and the peak FLOP/s they are measured against.

Counted as matmul FLOPs (2 per multiply-add), PaLM-style: every projection of every depth position (LoRA included,
as its two thin matmuls), attention scores and values over the full window (no causal halving): seq_len keys at a
global position, min(seq_len, sliding_window) at a local one (`ModelConfig.local_positions`), the head once per
applied exit. A training step is 3x the forward (backward = 2x), plus a teacher forward when distilling.
Remat recomputation is not counted: MFU measures useful work.
"""

import time

import jax
import jax.numpy as jnp

from rrt import model as model_lib

# Dense bf16 peak FLOP/s per chip, from vendors' spec sheets.
PEAK_BF16 = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def forward_flops_per_token(cfg: model_lib.ModelConfig, seq_len: int, heads_applied: int = 1) -> float:
    per_position = 0
    for proj, (din, dout) in cfg.projections().items():
        per_position += din * dout + cfg.rank(proj) * (din + dout)
    local = cfg.local_positions()
    n_local = int(local.sum())
    keys = (cfg.n_layers - n_local) * seq_len + n_local * min(seq_len, cfg.sliding_window)  # summed over positions
    attention = 2 * keys * cfg.n_heads * cfg.head_dim  # q.k and p.v
    return 2.0 * (cfg.n_layers * per_position + attention + heads_applied * cfg.d_model * cfg.vocab_size)


def train_flops_per_token(cfg, seq_len, heads_applied=1, teacher: model_lib.ModelConfig | None = None) -> float:
    flops = 3 * forward_flops_per_token(cfg, seq_len, heads_applied)
    if teacher is not None:
        flops += forward_flops_per_token(teacher, seq_len)
    return flops


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul on device 0 (the practical peak on CPUs, where no spec sheet applies), with
    float32 accumulation as rrt's dots (a bf16-output dot gets a slower kernel on XLA:CPU: rrt.lora.mixed_matmul)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        f(a).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def peak_flops_per_device(dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_BF16.items():
        if kind.startswith(name):
            return (peak if dtype == "bfloat16" else peak / 2), f"spec sheet ({kind})"
    return measure_matmul_peak(dtype=jnp.dtype(dtype)), f"measured matmul peak ({kind})"
