"""rrt.lora's mixed-precision dots (bfloat16 operands, float32 accumulation) against numpy in float64 on the same
bf16-rounded operands: the value rounded once, and the float32 master weight's gradient in float32, with no round
trip through bfloat16 (that round trip alone is a relative error of ~4e-3, far above the bound checked here)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrt import lora

N, I, O = 96, 48, 80


def bf16_exact(a):
    """a rounded to bfloat16, as float64 (exact)."""
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)


def operands(transposed_weight: bool):
    r = np.random.default_rng(0)
    x = bf16_exact(r.standard_normal((N // 4, 4, I)))
    w = r.standard_normal((O, I) if transposed_weight else (I, O)).astype(np.float32)
    g = bf16_exact(r.standard_normal((N // 4, 4, O)))
    return x, w, g


def value_and_grads(fn, x, w, g, in_scan: bool):
    """(y, dx, dw) of fn(x_bf16, w_f32) with cotangent g; in_scan runs it as the body of a 2-step lax.scan (the
    layer stack's setting, where rrt saves x^T across the loop on CPU)."""

    def f(x, w):
        if not in_scan:
            return fn(x, w)
        ys = jax.lax.scan(lambda c, w_: (c, fn(x, w_)), 0.0, jnp.stack([w, 0 * w]))[1]
        return ys[0]

    y, vjp = jax.vjp(jax.jit(f), jnp.asarray(x, jnp.bfloat16), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g, y.dtype))
    return y, dx, dw


@pytest.mark.parametrize("in_scan", [False, True], ids=["plain", "in-scan"])
@pytest.mark.parametrize("transposed", [False, True], ids=["w[I,O]", "w[O,I] (tied head)"])
def test_mixed_matmul_equals_float64_on_bf16_operands(transposed, in_scan):
    x, w, g = operands(transposed)
    fn = functools.partial(lora.matmul_rows, w_transposed=transposed)
    y, dx, dw = value_and_grads(fn, x, w, g, in_scan)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    wb = bf16_exact(w)
    w_IxO = wb.T if transposed else wb
    x2, g2 = x.reshape(-1, I), g.reshape(-1, O)
    # value and d x: float32 sums, then one rounding to bf16 (relative 2^-8)
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(-1, O), x2 @ w_IxO, rtol=8e-3, atol=8e-3)
    np.testing.assert_allclose(np.asarray(dx, np.float64).reshape(-1, I), g2 @ w_IxO.T, rtol=8e-3, atol=8e-3)
    # d w: bf16 products summed in float32, returned in float32: float32 accuracy
    dw_ref = x2.T @ g2
    np.testing.assert_allclose(np.asarray(dw, np.float64), dw_ref.T if transposed else dw_ref, rtol=1e-5, atol=1e-5)


def test_float32_logits_from_bf16_rows():
    """out_dtype=float32 (the head): logits unrounded, d x rounded to bf16 once."""
    x, w, g = operands(True)
    head = functools.partial(lora.matmul_rows, out_dtype=jnp.float32, w_transposed=True)
    y, dx, dw = value_and_grads(head, x, w, g, False)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64).reshape(-1, O), x.reshape(-1, I) @ bf16_exact(w).T,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(np.asarray(dw, np.float64), g.reshape(-1, O).T @ x.reshape(-1, I), rtol=1e-5, atol=1e-5)
