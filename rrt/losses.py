"""Uptraining losses: masked next-token cross-entropy, forward-KL distillation, early-exit weighting.

The student's head is applied after every loop r (early exit); loop r's loss is
    L_r = (1 - kd_weight) * CE_r + kd_weight * T^2 * KL(teacher_T || student_r,T)
and the total is sum_r w_r L_r with w = (exit_weight, ..., exit_weight, 1) (paper: 0.1 on intermediate loops, 1.0
on the last; exit_weight 0 trains only the last loop). Token losses are averaged over `loss_mask`.

At large vocabularies the [B, T, V] float32 logits dominate memory (V = 256,000 at 8 x 2,048 tokens: 16 GiB per
copy, one per trained exit plus the teacher's). `chunked_ce_kl` computes the same sums over chunks of the sequence
under remat, so only [B, chunk, V] is ever live (training's `loss.chunk_tokens`).
"""

import jax
import jax.numpy as jnp


def loop_weights(n_loops: int, exit_weight: float) -> list[float]:
    return [exit_weight] * (n_loops - 1) + [1.0]


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Sum over tokens of -log p(target), masked (float32): sum(mask * (logsumexp(logits) - logits[target])).

    Its gradient is written out (`jax.custom_vjp`): d logits = g * mask * (softmax(logits) - onehot(target)), one
    elementwise pass over [B, T, V] from the saved logsumexp. Autodiff of log_softmax + take_along_axis instead
    builds the [B, T, V] log-probabilities, a zero [B, T, V] buffer and a scatter into it, several passes over the
    largest tensor of the step (on SmolLM2's V = 49,152 the head and loss took ~1.5x longer; docs/TRAINING.md)."""
    return _cross_entropy(logits_BxTxV.astype(jnp.float32), targets_BxT, mask_BxT.astype(jnp.float32))


@jax.custom_vjp
def _cross_entropy(logits_BxTxV, targets_BxT, mask_BxT):
    return _cross_entropy_fwd(logits_BxTxV, targets_BxT, mask_BxT)[0]


def _cross_entropy_fwd(logits_BxTxV, targets_BxT, mask_BxT):
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return jnp.sum((lse_BxT - target_BxT) * mask_BxT), (logits_BxTxV, lse_BxT, targets_BxT, mask_BxT)


def _cross_entropy_bwd(res, g):
    logits_BxTxV, lse_BxT, targets_BxT, mask_BxT = res
    onehot = jnp.arange(logits_BxTxV.shape[-1], dtype=targets_BxT.dtype) == targets_BxT[..., None]
    d_BxTxV = (jnp.exp(logits_BxTxV - lse_BxT[..., None]) - onehot) * (g * mask_BxT)[..., None]
    d_mask = g * (lse_BxT - jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0])
    return d_BxTxV, None, d_mask


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def forward_kl(
    student_BxTxV: jax.Array, teacher_BxTxV: jax.Array, mask_BxT: jax.Array, temperature: float
) -> jax.Array:
    """Sum over tokens of T^2 * KL(p_teacher || p_student) at temperature T."""
    t = temperature
    logp_s = jax.nn.log_softmax(student_BxTxV.astype(jnp.float32) / t, axis=-1)
    logp_t = jax.nn.log_softmax(teacher_BxTxV.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
    return (t * t) * jnp.sum(kl * mask_BxT)


def chunked_ce_kl(
    logits_fn,
    h_BxTxD: jax.Array,
    targets_BxT: jax.Array,
    mask_BxT: jax.Array,
    chunk: int,
    teacher_logits_fn=None,
    teacher_h_BxTxD: jax.Array | None = None,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(`cross_entropy`, `forward_kl`) of `logits_fn(h)` without ever holding [B, T, V] logits: a `lax.scan` over
    chunks of `chunk` positions along T, each chunk's logits (and the teacher's, from its final hidden state)
    recomputed in the backward pass (`jax.checkpoint`). Peak logits memory is [B, chunk, V] per model; the batch
    axis stays as sharded as `h`. T is padded to a multiple of `chunk` with masked positions. KL is 0 without a
    teacher."""
    B, T, _ = h_BxTxD.shape
    n = -(-T // chunk)
    pad = n * chunk - T

    def split(x):  # [B, T, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((B, n, chunk) + x.shape[2:]), 1, 0)

    xs = (split(h_BxTxD), split(targets_BxT), split(mask_BxT.astype(jnp.float32)))
    if teacher_logits_fn is not None:
        xs += (split(teacher_h_BxTxD),)

    @jax.checkpoint
    def body(carry, x):
        h, t, m = x[:3]
        logits = logits_fn(h)
        c = cross_entropy(logits, t, m)
        k = forward_kl(logits, teacher_logits_fn(x[3]), m, temperature) if teacher_logits_fn is not None else 0.0
        return (carry[0] + c, carry[1] + k), None

    zero = jnp.zeros((), jnp.float32)
    (ce, kl), _ = jax.lax.scan(body, (zero, zero), xs)
    return ce, kl
