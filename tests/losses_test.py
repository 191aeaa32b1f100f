"""Losses against direct numpy computations, and how train.loss_fn weights the loops (early exit) and distillation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rrt import losses, train
from rrt import model as model_lib

B, T, V = 2, 5, 11


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def arrays(seed=0):
    rng = np.random.default_rng(seed)
    student = rng.normal(0, 2, (B, T, V)).astype(np.float32)
    teacher = rng.normal(0, 2, (B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    mask[1, 3:] = 0
    return student, teacher, targets, mask


def test_cross_entropy_matches_numpy():
    student, _, targets, mask = arrays()
    logp = np_log_softmax(student.astype(np.float64))
    want = -(np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum()
    np.testing.assert_allclose(losses.cross_entropy(student, targets, mask), want, rtol=1e-6)


def test_cross_entropy_gradient_matches_torch():
    """The hand-written backward (softmax - onehot, masked) against torch's autograd of its own cross-entropy, and
    against the closed form in numpy; also the gradient under a scaled upstream cotangent."""
    import torch

    student, _, targets, mask = arrays(1)
    got = jax.grad(lambda x: 3.0 * losses.cross_entropy(x, jnp.asarray(targets), jnp.asarray(mask)))(student)
    x = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    nll = torch.nn.functional.cross_entropy(
        x.reshape(-1, V), torch.tensor(targets).long().reshape(-1), reduction="none"
    )
    (3.0 * (nll * torch.tensor(mask, dtype=torch.float64).reshape(-1)).sum()).backward()
    np.testing.assert_allclose(got, x.grad.numpy(), rtol=1e-5, atol=1e-7)
    p = np.exp(np_log_softmax(student.astype(np.float64)))
    want = 3.0 * (p - np.eye(V)[targets]) * mask[..., None]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert np.all(got[1, 3:] == 0)  # masked tokens get no gradient


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_forward_kl_matches_numpy(temperature):
    student, teacher, _, mask = arrays()
    ls = np_log_softmax(student.astype(np.float64) / temperature)
    lt = np_log_softmax(teacher.astype(np.float64) / temperature)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)  # KL(teacher || student) per token
    want = temperature**2 * (kl * mask).sum()
    np.testing.assert_allclose(losses.forward_kl(student, teacher, mask, temperature), want, rtol=1e-5)
    assert float(losses.forward_kl(teacher, teacher, mask, temperature)) == pytest.approx(0.0, abs=1e-5)
    # forward KL is not symmetric: swapping the roles gives the reverse KL
    assert abs(float(losses.forward_kl(teacher, student, mask, temperature)) - want) > 1e-3


def test_loop_weights():
    assert losses.loop_weights(1, 0.1) == [1.0]
    assert losses.loop_weights(3, 0.1) == [0.1, 0.1, 1.0]
    assert losses.loop_weights(2, 0.0) == [0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# train.loss_fn: sum over loops r of w_r * ((1 - kd) * CE_r + kd * KL_r), w = (exit_weight, ..., 1).

CFG = model_lib.ModelConfig(
    vocab_size=V, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32, n_loops=3, rank_attn=2
)
TEACHER = model_lib.ModelConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)


def micro_batch():
    _, _, targets, mask = arrays()
    inputs = np.roll(targets, 1, axis=1)
    ones = np.ones((B, T), np.int32)
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": mask,
        "segment_ids": ones,
        "positions": np.cumsum(ones, 1) - 1,
    }


def per_loop_reference(model, teacher, mb, temperature):
    """(CE_r, KL_r) per loop from the model's loop hiddens and head, computed outside loss_fn."""
    _, hiddens = model(mb["inputs"], mb["positions"], mb["segment_ids"], return_loop_hiddens=True)
    t_logits = teacher(mb["inputs"], mb["positions"], mb["segment_ids"])
    ce, kl = [], []
    for h in hiddens:
        logits = np.asarray(model.logits(h), np.float64)
        logp = np_log_softmax(logits)
        ce.append(-(np.take_along_axis(logp, mb["targets"][..., None], -1)[..., 0] * mb["loss_mask"]).sum())
        ls, lt = np_log_softmax(logits / temperature), np_log_softmax(np.asarray(t_logits, np.float64) / temperature)
        kl.append(temperature**2 * ((np.exp(lt) * (lt - ls)).sum(-1) * mb["loss_mask"]).sum())
    return np.array(ce), np.array(kl)


@pytest.mark.parametrize("exit_weight,kd_weight", [(0.0, 0.0), (0.1, 0.0), (0.3, 0.5)])
def test_loss_fn_weights_loops_and_distillation(exit_weight, kd_weight):
    model = model_lib.Decoder(CFG, rngs=nnx.Rngs(0))
    teacher = model_lib.Decoder(TEACHER, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    t_graphdef, t_state = nnx.split(teacher)
    mb = micro_batch()
    cfg = train.LossConfig(kd_weight=kd_weight, kd_temperature=2.0, exit_weight=exit_weight)
    total, (ce, kl) = train.loss_fn(
        nnx.to_pure_dict(state),
        nnx.to_pure_dict(t_state),
        mb,
        graphdef=graphdef,
        teacher_graphdef=t_graphdef,
        loss_cfg=cfg,
        constrain=None,
    )
    want_ce, want_kl = per_loop_reference(model, teacher, mb, 2.0)
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
    if kd_weight:
        np.testing.assert_allclose(kl, want_kl, rtol=1e-4)
    w = np.array([exit_weight, exit_weight, 1.0])
    want = (w * ((1 - kd_weight) * want_ce + kd_weight * (want_kl if kd_weight else 0))).sum()
    np.testing.assert_allclose(total, want, rtol=1e-5)


# default run under 20 min on CI; loss_fn's loop weights are checked by test_loss_fn_weights_loops_and_distillation
@pytest.mark.slow
def test_untrained_exits_get_no_gradient():
    """exit_weight 0: intermediate loops are logged but their heads' losses do not reach the parameters."""
    model = model_lib.Decoder(CFG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    mb = micro_batch()

    def grads(exit_weight, log_all_loops=True, log_loops=True):
        cfg = train.LossConfig(exit_weight=exit_weight, log_all_loops=log_all_loops)
        fn = jax.jit(
            lambda p, log: train.loss_fn(
                p, None, mb, log, graphdef=graphdef, teacher_graphdef=None, loss_cfg=cfg, constrain=None
            )
        )  # noqa: E731
        log = jnp.asarray(log_loops)  # traced, as the training loop passes it: one compiled step for both cases
        return jax.grad(lambda p: fn(p, log)[0])(params), fn(params, log)[1][0]

    g_logged, ce_logged = grads(0.0)
    g_skipped, ce_skipped = grads(0.0, log_all_loops=False)
    g_unlogged, ce_unlogged = grads(0.0, log_loops=False)  # a step the loop does not log
    for g in (g_skipped, g_unlogged):
        for a, b in zip(jax.tree.leaves(g_logged), jax.tree.leaves(g)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert np.all(np.asarray(ce_logged) > 0) and np.all(np.asarray(ce_skipped)[:2] == 0)
    np.testing.assert_array_equal(np.asarray(ce_unlogged)[:2], 0)
    np.testing.assert_allclose(np.asarray(ce_unlogged)[2], np.asarray(ce_logged)[2], rtol=1e-6)
    g_exit, _ = grads(0.5)
    diff = sum(float(jnp.sum(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g_exit), jax.tree.leaves(g_logged)))
    assert diff > 1e-4, "a nonzero exit weight must change the gradients"


@pytest.mark.parametrize(
    "chunk", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(5, marks=pytest.mark.slow), 8]
)  # 2: T = 5 padded to 6; 8: one chunk longer than the row
def test_chunked_losses_equal_the_full_logits_path_values_and_gradients(chunk):
    """loss.chunk_tokens: CE, KD and every exit's loss over chunks of the sequence (never [B, T, V]) equal the
    numpy reference, and the gradients equal the unchunked path's (which the test above checks against numpy)."""
    model = model_lib.Decoder(CFG, rngs=nnx.Rngs(0))
    teacher = model_lib.Decoder(TEACHER, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    t_graphdef, t_state = nnx.split(teacher)
    params, t_params = nnx.to_pure_dict(state), nnx.to_pure_dict(t_state)
    mb = micro_batch()

    def run(chunk_tokens):
        cfg = train.LossConfig(kd_weight=0.4, kd_temperature=2.0, exit_weight=0.3, chunk_tokens=chunk_tokens)
        fn = lambda p: train.loss_fn(  # noqa: E731
            p, t_params, mb, graphdef=graphdef, teacher_graphdef=t_graphdef, loss_cfg=cfg, constrain=None
        )
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    (total, (ce, kl)), grads = run(chunk)
    want_ce, want_kl = per_loop_reference(model, teacher, mb, 2.0)
    np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-4)
    (full_total, _), full_grads = run(0)
    np.testing.assert_allclose(total, full_total, rtol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        want = full_grads
        for k in path:
            want = want[k.key]
        g, want = np.asarray(g, np.float64), np.asarray(want, np.float64)
        err = np.linalg.norm(g - want) / max(np.linalg.norm(want), 1e-30)  # float32 sums in another order
        assert err < 1e-6, f"{jax.tree_util.keystr(path)}: relative error {err:.2e}"
    with pytest.raises(ValueError, match="chunk_tokens must be >= 0"):
        train.LossConfig(chunk_tokens=-1)
