"""LoRA as a wrapper around a projection.

A relaxed recursive model gives every depth position l its own low-rank delta on a shared projection:
    y = x @ W' + b + s * (x @ A_l) @ B_l,        s = alpha / r.
We store kernels input-first (`W: [I, O]`, y = x @ W), so the factors are `a: [I, P]` (input side, orthonormal
after SVD init) and `b: [P, O]` (output side, carries the singular values divided by s). In the paper's
output-first notation (W_torch = W^T) this is exactly B_torch = b^T and A_torch = a^T with W_l = W' + s B A.

The wrapper never looks inside the projection it wraps, so attention and MLP code has no LoRA branches. Factors may
carry a leading batch axis (`a: [B, I, P]`): continuous depth-wise batching gathers one position's factors per slot.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def matmul_rows(x: jax.Array, w_IxO: jax.Array) -> jax.Array:
    """x [..., I] @ w [I, O] as one 2-D [N, I] x [I, O] dot over the flattened leading axes, reshaped back. Same
    values as the batched einsum; on XLA:CPU the batched form's backward transposes [N, O] activations into
    [O, N] copies before the weight-gradient dot, which made SmolLM2's MLP step ~1.8x slower (rrt.benchmarks.profile,
    docs/TRAINING.md)."""
    y = jnp.matmul(x.reshape(-1, x.shape[-1]), w_IxO)
    return y.reshape(x.shape[:-1] + (w_IxO.shape[-1],))


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x @ kernel (+ bias) in the dtype of x."""
    y = matmul_rows(x, kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


def delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, group: jax.Array | None = None) -> jax.Array:
    """s * (x @ a) @ b, with optional per-example factors (a: [B, I, P], b: [B, P, O], x: [B, ..., I]), or grouped
    factors: a: [G, I, P], b: [G, P, O] and `group` [B, G] one-hot, example i using pair g. Grouped, every pair's
    x @ a is computed and masked between the two matmuls: G times the multiply-adds of one pair, but no per-example
    copies of the factors (depth-wise batching: G = R loops, cheaper than gathering a pair per example)."""
    a, b = a.astype(x.dtype), b.astype(x.dtype)
    if group is not None:
        mask = group.astype(x.dtype).reshape(group.shape[:1] + (1,) * (x.ndim - 2) + group.shape[1:] + (1,))
        xa = jnp.einsum("b...i,gip->b...gp", x, a) * mask
        return scale * jnp.einsum("b...gp,gpo->b...o", xa, b)
    if a.ndim == 2:
        return scale * matmul_rows(matmul_rows(x, a), b)
    xa = jnp.einsum("b...i,bip->b...p", x, a)
    return scale * jnp.einsum("b...p,bpo->b...o", xa, b)


def wrap(project: Callable[[jax.Array], jax.Array], factors: tuple | None, scale: float):
    """Returns x -> project(x) + s * (x @ a) @ b; `factors` is (a, b) or (a, b, group) (see `delta`);
    `factors=None` returns `project` unchanged (strict sharing)."""
    if factors is None:
        return project

    def wrapped(x):
        return project(x) + delta(x, factors[0], factors[1], scale, factors[2] if len(factors) > 2 else None)

    return wrapped


def project(x: jax.Array, kernel_IxO: jax.Array, bias: jax.Array | None, factors: tuple | None, scale: float):
    """x @ kernel (+ bias) (+ s (x @ a) @ b): `factors` as in `wrap`. Shared factors (a [I, P], b [P, O], no group)
    run as one dot with the merged weight W' + s a b where that is the cheaper: the rank-r path costs 2 N P (I + O)
    FLOPs forward and saves [N, P] for the backward, merging costs 2 I P O whatever the N rows (relaxed rank 64 15 x 2
    SmolLM2 step: 7.0 -> 6.2 s, 0.6 GiB less; docs/TRAINING.md). Few rows (decoding) keep the rank-r path."""
    shared = factors is not None and (len(factors) < 3 or factors[2] is None) and factors[0].ndim == 2
    i, o = kernel_IxO.shape
    if shared and x.size // x.shape[-1] * (i + o) >= i * o:
        return dense(x, merge(kernel_IxO, factors[0], factors[1], scale), bias)
    return wrap(lambda x: dense(x, kernel_IxO, bias), factors, scale)(x)


def merge(kernel_IxO: jax.Array, a_IxP: jax.Array, b_PxO: jax.Array, scale: float) -> jax.Array:
    """Materializes W' + s * a @ b (per position when a, b carry a leading axis)."""
    return kernel_IxO + scale * jnp.matmul(a_IxP, b_PxO)
