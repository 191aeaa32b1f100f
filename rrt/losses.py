"""Uptraining losses: masked next-token cross-entropy, forward-KL distillation, early-exit weighting.

The student's head is applied after every loop r (early exit); loop r's loss is
    L_r = (1 - kd_weight) * CE_r + kd_weight * T^2 * KL(teacher_T || student_r,T)
and the total is sum_r w_r L_r with w = (exit_weight, ..., exit_weight, 1) (paper: 0.1 on intermediate loops, 1.0
on the last; exit_weight 0 trains only the last loop). Token losses are averaged over `loss_mask`.
"""

import jax
import jax.numpy as jnp


def loop_weights(n_loops: int, exit_weight: float) -> list[float]:
    return [exit_weight] * (n_loops - 1) + [1.0]


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Sum over tokens of -log p(target), masked (float32)."""
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask_BxT)


def forward_kl(
    student_BxTxV: jax.Array, teacher_BxTxV: jax.Array, mask_BxT: jax.Array, temperature: float
) -> jax.Array:
    """Sum over tokens of T^2 * KL(p_teacher || p_student) at temperature T."""
    t = temperature
    logp_s = jax.nn.log_softmax(student_BxTxV.astype(jnp.float32) / t, axis=-1)
    logp_t = jax.nn.log_softmax(teacher_BxTxV.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
    return (t * t) * jnp.sum(kl * mask_BxT)
