"""LoRA as a wrapper around a projection.

A relaxed recursive model gives every depth position l its own low-rank delta on a shared projection:
    y = x @ W' + b + s * (x @ A_l) @ B_l,        s = alpha / r.
We store kernels input-first (`W: [I, O]`, y = x @ W), so the factors are `a: [I, P]` (input side, orthonormal
after SVD init) and `b: [P, O]` (output side, carries the singular values divided by s). In the paper's
output-first notation (W_torch = W^T) this is exactly B_torch = b^T and A_torch = a^T with W_l = W' + s B A.

The wrapper never looks inside the projection it wraps, so attention and MLP code has no LoRA branches. Factors may
carry a leading batch axis (`a: [B, I, P]`): continuous depth-wise batching gathers one position's factors per slot.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rrt import platform as platform_lib


def matmul_rows(x: jax.Array, w: jax.Array, out_dtype=None, w_transposed: bool = False) -> jax.Array:
    """x [..., I] @ w for w [I, O], or x @ w^T for w stored [O, I] with `w_transposed` (a tied head: the embedding
    table [V, D]), as one 2-D dot over the flattened leading axes, reshaped back, in the dtype of x (or
    `out_dtype`). Same values as the batched einsum; on XLA:CPU the batched form's backward transposes [N, O]
    activations into [O, N] copies before the weight-gradient dot, which made SmolLM2's MLP step ~1.8x slower
    (rrt.benchmarks.profile, docs/TRAINING.md). Below float32 (mixed precision) on XLA:CPU, `mixed_matmul`."""
    x_NxI = x.reshape(-1, x.shape[-1])
    if mixed_on_cpu(x):
        y = mixed_matmul(x_NxI, w, jnp.dtype(out_dtype or x.dtype), w_transposed)
    else:
        w = w.astype(x.dtype)
        y = jnp.matmul(x_NxI, w.T if w_transposed else w, preferred_element_type=out_dtype)
    return y.reshape(x.shape[:-1] + y.shape[-1:])


def mixed_on_cpu(x: jax.Array) -> bool:
    """Whether x's dots take `mixed_matmul`: compute below float32, traced for XLA:CPU (rrt.platform). GPUs and TPUs
    keep XLA's own bf16 dots and the layout of their gradients (and their all-reduces, sized in rrt.aot)."""
    return jnp.dtype(x.dtype) != jnp.float32 and platform_lib.name() == "cpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def mixed_matmul(x_NxI: jax.Array, w: jax.Array, out_dtype, w_transposed: bool) -> jax.Array:
    """x @ w (w [I, O]) or x @ w^T (w [O, I], `w_transposed`) in mixed precision: the operands in the dtype of x (w
    is cast, and may stay float32 outside), products accumulated in float32, the result in `out_dtype`. The
    backward's dots take the cotangent in the dtype of x and accumulate in float32 too, and the weight's gradient
    comes back in w's own dtype without a round trip through x's: a float32 master weight gets a float32 gradient.

    Written out (a custom VJP) for XLA:CPU: its fast bfloat16 kernels (YNNPACK on AMX/AVX512-BF16: 1.0-1.4 TFLOP/s
    against 0.25 in float32 on the 2 cores of docs/TRAINING.md) take only bf16 x bf16 -> f32 dots whose left operand
    contracts its last axis; a bf16-output dot, or the weight gradient x^T dy as autodiff writes it, is upcast to a
    float32 dot, and so is a dot fed by a transpose in the same computation. So every dot names its contraction on
    untransposed operands, and for w [I, O] the forward saves x^T [I, N] for the weight gradient: in the layer scan
    it crosses the loop as its own buffer, and that dot is canonical (bf16 SmolLM2 step on 2 cores: 9.0 -> 5.2-5.7
    s; docs/TRAINING.md). For w [O, I] the forward and d x are canonical as they stand; d w = d y^T x contracts the
    rows and runs as XLA lays it out."""
    return _mixed_matmul_fwd(x_NxI, w, out_dtype, w_transposed)[0]


def _dot(a, b, contracting) -> jax.Array:
    return jax.lax.dot_general(a, b, (contracting, ((), ())), preferred_element_type=jnp.float32)


def _mixed_matmul_fwd(x_NxI, w, out_dtype, w_transposed):
    w_low = w.astype(x_NxI.dtype)
    y = _dot(x_NxI, w_low, ((1,), (1,) if w_transposed else (0,))).astype(out_dtype)
    w_dtype = jnp.zeros((0,), w.dtype)  # an empty array carrying w's dtype to the backward
    return y, (x_NxI if w_transposed else x_NxI.T, w_low, w_dtype)


def _mixed_matmul_bwd(out_dtype, w_transposed, residuals, dy_NxO):
    x_saved, w_low, w_dtype = residuals
    dy_NxO = dy_NxO.astype(w_low.dtype)
    dx_NxI = _dot(dy_NxO, w_low, ((1,), (0,) if w_transposed else (1,))).astype(w_low.dtype)
    if w_transposed:  # d w [O, I] = d y^T x
        dw = _dot(dy_NxO, x_saved, ((0,), (0,)))
    else:  # d w [I, O] = (x^T) d y, x^T saved
        dw = _dot(x_saved, dy_NxO, ((1,), (0,)))
    return dx_NxI, dw.astype(w_dtype.dtype)


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x @ kernel (+ bias) in the dtype of x."""
    y = matmul_rows(x, kernel)
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


def delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, group: jax.Array | None = None) -> jax.Array:
    """s * (x @ a) @ b, with optional per-example factors (a: [B, I, P], b: [B, P, O], x: [B, ..., I]), or grouped
    factors: a: [G, I, P], b: [G, P, O] and `group` [B, G] one-hot, example i using pair g. Grouped, every pair's
    x @ a is computed and masked between the two matmuls: G times the multiply-adds of one pair, but no per-example
    copies of the factors (depth-wise batching: G = R loops, cheaper than gathering a pair per example)."""
    if a.ndim == 2 and group is None:  # matmul_rows casts the factors itself (their gradients stay in their dtype)
        return scale * matmul_rows(matmul_rows(x, a), b)
    a, b = a.astype(x.dtype), b.astype(x.dtype)
    if group is not None:
        mask = group.astype(x.dtype).reshape(group.shape[:1] + (1,) * (x.ndim - 2) + group.shape[1:] + (1,))
        xa = jnp.einsum("b...i,gip->b...gp", x, a) * mask
        return scale * jnp.einsum("b...gp,gpo->b...o", xa, b)
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
