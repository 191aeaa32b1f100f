"""The optax chain: schedule shapes, the weight-decay mask, per-group learning rates, freezing, and gradient
accumulation (grad_accum=2 gives the step grad_accum=1 gives on the same global batch)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rrt import model as model_lib
from rrt import optim, train

PEAK = 1e-3


def params_tree():
    """One parameter per kind of name the groups and the decay mask distinguish."""
    ones = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
    return {
        "embed": ones(8, 4),
        "layers": {"q": ones(2, 4, 4), "attn_norm": ones(2, 4), "q_bias": ones(2, 4)},
        "relax": {"q_a": ones(4, 4, 2), "q_b": ones(4, 2, 4), "attn_norm": ones(4, 4)},
        "final_norm": ones(4),
    }


def one_update(cfg: optim.OptimConfig, grads_value: float):
    """(params after the first update, opt_state) with every gradient equal to `grads_value`."""
    params = params_tree()
    opt, _ = optim.make(cfg, params)
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, grads_value), params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def flat(tree) -> dict:
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_cosine_schedule_shape():
    cfg = optim.OptimConfig(lr=PEAK, schedule="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    s = optim.schedule(cfg, PEAK)
    np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, PEAK / 2, PEAK], rtol=1e-6)
    halfway = 0.1 * PEAK + 0.9 * PEAK * 0.5 * (1 + math.cos(math.pi * 0.5))
    np.testing.assert_allclose([s(60), s(110), s(500)], [halfway, 0.1 * PEAK, 0.1 * PEAK], rtol=1e-5)
    values = [float(s(i)) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine decay is not monotone"
    # warmup_steps == total_steps is allowed (all warmup) and must not break optax's cosine
    s = optim.schedule(optim.OptimConfig(schedule="cosine", warmup_steps=5, total_steps=5), PEAK)
    np.testing.assert_allclose([s(0), s(5)], [0.0, PEAK], rtol=1e-6)


def test_wsd_schedule_shape():
    cfg = optim.OptimConfig(schedule="wsd", warmup_steps=10, total_steps=100, decay_fraction=0.2, min_lr_ratio=0.1)
    s = optim.schedule(cfg, PEAK)
    np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, PEAK / 2, PEAK], rtol=1e-6)
    np.testing.assert_allclose([s(11), s(50), s(80)], [PEAK] * 3, rtol=1e-6)  # stable until the last 20 steps
    np.testing.assert_allclose([s(90), s(100)], [0.55 * PEAK, 0.1 * PEAK], rtol=1e-5)  # linear to the floor


def test_constant_schedule_and_bad_configs():
    s = optim.schedule(optim.OptimConfig(schedule="constant", warmup_steps=4, total_steps=10), PEAK)
    np.testing.assert_allclose([s(0), s(2), s(4), s(9)], [0.0, PEAK / 2, PEAK, PEAK], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown schedule"):
        optim.OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.OptimConfig(warmup_steps=20, total_steps=10)
    with pytest.raises(ValueError, match="exceed total_steps"):
        optim.schedule(optim.OptimConfig(schedule="wsd", warmup_steps=9, total_steps=10, decay_fraction=0.5), PEAK)


def test_weight_decay_mask_spares_norms_and_biases():
    # Zero gradients: Adam's step is 0, so only decoupled weight decay moves a parameter: p <- p - lr * wd * p.
    cfg = optim.OptimConfig(lr=0.5, schedule="constant", warmup_steps=0, weight_decay=0.1, clip_norm=0)
    new, _ = one_update(cfg, 0.0)
    got = {k: float(v.reshape(-1)[0]) for k, v in flat(new).items()}
    decayed = {"['embed']", "['layers']['q']", "['relax']['q_a']", "['relax']['q_b']"}
    for name, value in got.items():
        np.testing.assert_allclose(value, 1 - 0.5 * 0.1 if name in decayed else 1.0, rtol=1e-6, err_msg=name)


def test_per_group_learning_rates():
    # Adam's first step is lr * sign(g) (bias-corrected m / sqrt(v) = g / |g|); no decay, no clipping.
    cfg = optim.OptimConfig(
        lr=1e-2, lora_lr=1e-1, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=0, eps=1e-12
    )
    new, _ = one_update(cfg, 1.0)
    for name, value in flat(new).items():
        lr = 1e-1 if name.startswith("['relax']['q_") and name[-4:-2] in ("_a", "_b") else 1e-2
        np.testing.assert_allclose(np.asarray(value), 1.0 - lr, rtol=1e-6, err_msg=name)
    assert optim.group("relax/q_a") == "lora" and optim.group("relax/attn_norm") == "shared"
    assert optim.group("head") == "embed" and optim.group("layers/q") == "shared"


def test_freeze_shared_and_embeddings():
    cfg = optim.OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0, freeze_shared=True, freeze_embeddings=True)
    new, state = one_update(cfg, 1.0)
    for name, value in flat(new).items():
        moved = not np.allclose(np.asarray(value), 1.0)
        is_lora = name.startswith("['relax']['q_") and name[-4:-2] in ("_a", "_b")
        assert moved == is_lora, f"{name}: moved={moved}"
    # Frozen groups keep no optimizer state: only the LoRA factors have Adam moments.
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    moments = [p for p in paths if ".mu" in p]
    assert moments and all("'lora'" in m for m in moments), moments


# ---------------------------------------------------------------------------------------------------------------
# Gradient accumulation, through the real train_step.

CFG = model_lib.ModelConfig(
    vocab_size=96, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, n_loops=2, rank_attn=2
)


def batch(rows: int = 4, t: int = 16) -> dict:
    rng = np.random.default_rng(1)
    inputs = rng.integers(0, CFG.vocab_size, (rows, t)).astype(np.int32)
    segment_ids = np.ones((rows, t), np.int32)
    segment_ids[0, 10:] = 2  # two documents in row 0
    segment_ids[1, 12:] = 0  # padding at the end of row 1
    positions = np.arange(t, dtype=np.int32)[None].repeat(rows, 0)
    positions[0, 10:] -= 10
    return {
        "inputs": inputs,
        "targets": np.roll(inputs, -1, axis=1),
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": (segment_ids > 0).astype(np.float32),
    }


def test_grad_accum_matches_one_big_batch():
    graphdef, state = nnx.split(model_lib.Decoder(CFG, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    params["relax"] = jax.tree.map(lambda x: x + 0.01, params["relax"])  # nonzero LoRA B: every factor gets grads
    opt, _ = optim.make(optim.OptimConfig(schedule="constant", warmup_steps=0, clip_norm=0.5), params)
    results = []
    for n_micro in (1, 2):
        step = jax.jit(
            functools.partial(
                train.train_step,
                opt=opt,
                n_micro=n_micro,
                n_loops=CFG.n_loops,
                graphdef=graphdef,
                teacher_graphdef=None,
                loss_cfg=train.LossConfig(exit_weight=0.3),
                constrain=None,
            )
        )
        results.append(step(params, opt.init(params), None, batch()))
    (p1, s1, m1), (p2, s2, m2) = results
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
    # Adam's first moments hold the (clipped) gradient itself: compare it, then each parameter's update. Norm-wise:
    # Adam's first step is about lr * sign(g), so an element whose gradient is float32 noise may differ alone.
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a) - b) / max(np.linalg.norm(b), 1e-30))  # noqa: E731
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s1), jax.tree.leaves(s2)):
        assert rel(b, a) < 1e-5, (jax.tree_util.keystr(path), rel(b, a))
    for (path, a), b, p0 in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p2), jax.tree.leaves(params)):
        assert rel(b - p0, a - p0) < 1e-3, (jax.tree_util.keystr(path), rel(b - p0, a - p0))
    assert float(m1["tokens"]) == batch()["loss_mask"].sum()


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", math.nan),
        ("lr", math.inf),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lora_lr", math.nan),
        ("lora_lr", 0.0),
        ("b1", 1.0),
        ("b2", math.nan),
        ("eps", 0.0),
        ("weight_decay", -0.1),
        ("weight_decay", math.nan),
        ("clip_norm", math.inf),
        ("min_lr_ratio", 1.5),
        ("decay_fraction", math.nan),
        ("warmup_steps", 2.5),
    ],
)
def test_bad_optimizer_fields_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"optim\.{field} must be .*got {value!r}"):
        optim.OptimConfig(**{field: value})


def test_a_non_finite_state_is_never_saved(tmp_path):
    from rrt import train_state

    mngr = train_state.manager(str(tmp_path), 1, None, async_save=False)
    good = {"w": jnp.ones((3,))}
    assert train_state.save(mngr, 1, good, {"m": jnp.zeros((3,))}, {"step": 1}, {"pos": 1}, force=True)
    bad = {"w": jnp.array([1.0, jnp.nan, 2.0])}
    with pytest.raises(FloatingPointError, match=r"after step 2: not saved\. The last good checkpoint \(step 1\)"):
        train_state.save(mngr, 2, bad, {"m": jnp.zeros((3,))}, {"step": 2}, {"pos": 2}, force=True)
    with pytest.raises(FloatingPointError, match="step 2"):  # the optimizer state is checked too
        train_state.save(mngr, 2, good, {"m": jnp.full((3,), jnp.inf)}, {"step": 2}, {"pos": 2}, force=True)
    assert list(mngr.all_steps()) == [1]
    mngr.close()
