"""A relaxed projection x W + b + s (x A) B, in value and gradient, against numpy: with few rows rrt runs the rank-r
path, with many it merges W + s A B into one dot (rrt.lora.project); both must equal the formula."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rrt import model as model_lib


@pytest.mark.parametrize("rows", [2, 48], ids=["rank-path", "merged"])  # d 24 x 40, r 4: merging from 15 rows
def test_projection_equals_the_formula_in_value_and_gradients(rows):
    cfg = dataclasses.replace(
        model_lib.ModelConfig(vocab_size=16, d_model=24, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=20, d_ff=40),
        n_loops=2, rank_attn=4, rank_mlp=4, lora_alpha=6.0,
    )  # fmt: skip
    s = cfg.lora_scale("up")
    r = np.random.default_rng(0)
    x = r.standard_normal((rows // 2, 2, 24)).astype(np.float32)
    g = r.standard_normal((rows // 2, 2, 40)).astype(np.float32)
    w = {"up": r.standard_normal((24, 40)), "up_a": r.standard_normal((24, 4)), "up_b": r.standard_normal((4, 40))}
    w = {k: v.astype(np.float32) for k, v in w.items()}

    def loss(w):
        return jnp.sum(model_lib.projection(cfg, w, "up")(jnp.asarray(x)) * g)

    value, grads = jax.value_and_grad(loss)(jax.tree.map(jnp.asarray, w))
    x2, g2 = x.reshape(-1, 24).astype(np.float64), g.reshape(-1, 40).astype(np.float64)
    W, A, B = (w[k].astype(np.float64) for k in ("up", "up_a", "up_b"))
    y = x2 @ W + s * (x2 @ A) @ B
    np.testing.assert_allclose(float(value), np.sum(y * g2), rtol=1e-5)
    np.testing.assert_allclose(grads["up"], x2.T @ g2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["up_a"], s * x2.T @ g2 @ B.T, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(grads["up_b"], s * (x2 @ A).T @ g2, rtol=1e-4, atol=1e-3)
