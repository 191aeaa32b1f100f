"""The attention kernels against each other and a numpy reference, on packed rows (several documents per row).

* xla (positions mask) equals numpy, with and without a sliding window and a logit soft cap; its query blocks
  (`attention.blockwise`: the causal half, windows skipping key ranges) equal one dense masked softmax, values
  and gradients.
* splash (Pallas interpret mode on CPU) equals xla, forward and gradients wrt q, k, v, for MHA, GQA and MQA,
  float32 to 1e-5 (measured: at most 6e-7) and bfloat16 to 2e-2 (measured: at most 7.5e-3; the XLA path rounds
  probabilities to bf16 before the value matmul, splash keeps them in float32), relative to the largest entry.
* The cuDNN arguments (segment ids as a mask) run through XLA's implementation equal the reference: a packed
  document attending to another one (maxtext#4476) fails this.
* The whole relaxed recursive model, forward and gradient, attention=splash equals attention=xla (cycle; sequence
  under -m slow).
* On 4 fake devices splash runs in its shard_map (rows over fsdp, heads over tensor) and still equals xla.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rrt import attention
from rrt import model as model_lib

B, T, H = 2, 128, 16  # splash needs rows of a multiple of 128 tokens
DOCS = [[40, 60, 28], [128]]  # row 0 packs three documents, row 1 is one


def packed_rows(docs=DOCS, t=T):
    """Positions restart at 0 per document (as rrt/data/packing.py writes them); segment ids count from 1."""
    seg, pos = np.zeros((len(docs), t), np.int32), np.zeros((len(docs), t), np.int32)
    for b, lengths in enumerate(docs):
        start = 0
        for i, n in enumerate(lengths):
            seg[b, start : start + n], pos[b, start : start + n] = i + 1, np.arange(n)
            start += n
    return pos, seg


def qkv(n, g, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    mk = lambda heads: jnp.asarray(r.normal(size=(B, T, heads, H)), dtype)  # noqa: E731
    return mk(n), mk(g), mk(g)


def numpy_reference(q, k, v, pos, seg, window=None, cap=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n, g = q.shape[2], k.shape[2]
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for i in range(n):
            j = i // (n // g)
            logits = q[b, :, i] @ k[b, :, j].T / np.sqrt(H)
            if cap is not None:
                logits = cap * np.tanh(logits / cap)
            d = pos[b][:, None] - pos[b][None, :]
            ok = (d >= 0) & (seg[b][:, None] == seg[b][None, :])
            if window is not None:
                ok &= d < window
            logits = np.where(ok, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, :, i] = (p / p.sum(-1, keepdims=True)) @ v[b, :, j]
    return out


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


@pytest.mark.parametrize("window,cap", [(None, None), (8, None), (None, 5.0), (12, 3.0)])
@pytest.mark.parametrize("n,g", HEADS)
def test_xla_equals_numpy(n, g, window, cap):
    pos, seg = packed_rows()
    q, k, v = qkv(n, g)
    out = attention.self_attention(q, k, v, pos, seg, kind="xla", sliding_window=window, soft_cap=cap)
    assert rel(out, numpy_reference(q, k, v, pos, seg, window, cap)) < 1e-5


def dense_reference(q, k, v, pos, seg, window=None, cap=None, local=True):
    """The textbook formula in jnp (one [T, T] score matrix per head, masked with -inf), for gradients."""
    n, g = q.shape[2], k.shape[2]
    kq, vq = jnp.repeat(k, n // g, axis=2), jnp.repeat(v, n // g, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, kq) / np.sqrt(q.shape[-1])
    if cap is not None:
        logits = cap * jnp.tanh(logits / cap)
    d = pos[:, :, None] - pos[:, None, :]
    ok = (d >= 0) & (seg[:, :, None] == seg[:, None, :])
    if window is not None:
        ok &= (d < window) | ~jnp.asarray(local)
    p = jax.nn.softmax(jnp.where(ok[:, None], logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, vq)


@pytest.mark.parametrize(
    "n,g,block,window,cap,local",
    [
        (4, 4, 32, None, None, None),
        (4, 2, 48, None, 3.0, None),
        (4, 1, 16, 8, None, None),
        (4, 2, 40, 20, 4.0, None),
        (4, 2, 32, 20, None, False),
    ],
)
def test_blockwise_equals_the_dense_formula_forward_and_gradients(n, g, block, window, cap, local):
    """The XLA path's query blocks (blocks that do not divide T, windows that skip whole key ranges, a traced
    local flag that keeps them) equal one dense masked softmax, in value (also against numpy) and gradients."""
    pos, seg = packed_rows()
    q, k, v = qkv(n, g)
    w = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, n, H)), jnp.float32)
    flag = None if local is None else jnp.asarray(local)

    def ours(q, k, v):
        out = attention.blockwise(q, k, v, pos, seg, block=block, sliding_window=window, soft_cap=cap, local=flag)
        return jnp.sum(out * w), out

    def ref(q, k, v):
        out = dense_reference(q, k, v, pos, seg, window, cap, True if local is None else local)
        return jnp.sum(out * w), out

    (val, out), grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (val_r, out_r), grads_r = jax.value_and_grad(ref, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert rel(out, numpy_reference(q, k, v, pos, seg, window if local is not False else None, cap)) < 1e-5
    assert rel(val, val_r) < 1e-5
    for name, a, b in zip("qkv", grads, grads_r):
        assert rel(a, b) < 1e-5, name


def _loss(kind, **kw):
    pos, seg = packed_rows()
    w = jnp.asarray(np.random.default_rng(9).normal(size=(B, T, 1, H)), jnp.float32)  # a non-trivial cotangent

    def f(q, k, v):
        out = attention.self_attention(q, k, v, pos, seg, kind=kind, **kw)
        return jnp.sum(out.astype(jnp.float32) * w)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))


@pytest.mark.parametrize(
    "n,g,dtype,window,cap",
    [
        (4, 4, jnp.float32, None, None),
        (4, 2, jnp.float32, None, None),
        (4, 1, jnp.float32, None, None),
        (4, 2, jnp.bfloat16, None, None),
        (4, 2, jnp.float32, 16, 4.0),
    ],
)
def test_splash_equals_xla_forward_and_gradients(n, g, dtype, window, cap):
    q, k, v = qkv(n, g, dtype)
    kw = dict(sliding_window=window, soft_cap=cap)
    val_x, grads_x = _loss("xla", **kw)(q, k, v)
    val_s, grads_s = _loss("splash", **kw)(q, k, v)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert rel(val_s, val_x) < tol
    for name, gs, gx in zip("qkv", grads_s, grads_x):
        assert rel(gs, gx) < tol, name


@pytest.mark.parametrize("kind", ["xla", "splash"])
def test_traced_local_flag_picks_the_window(kind):
    """Models whose local and global layers alternate pass the kind as a traced flag (one compiled block serves
    both): the window applies exactly where it is true (splash: `lax.cond` between its two static masks)."""
    pos, seg = packed_rows()
    q, k, v = qkv(4, 2)
    fn = jax.jit(
        lambda q, k, v, local: attention.self_attention(
            q, k, v, pos, seg, kind=kind, sliding_window=16, soft_cap=4.0, local=local
        )
    )
    for local, window in ((True, 16), (False, None)):
        assert rel(fn(q, k, v, jnp.asarray(local)), numpy_reference(q, k, v, pos, seg, window, 4.0)) < 1e-5


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("n,g", HEADS)
def test_cudnn_arguments_keep_packed_documents_apart(n, g, window):
    """What attention='cudnn' passes to jax.nn.dot_product_attention, run by XLA's implementation (this CPU has no
    cuDNN): equal to the reference on rows packing three documents."""
    pos, seg = packed_rows()
    q, k, v = qkv(n, g)
    args = attention.cudnn_arguments(q, k, v, jnp.asarray(seg), window)
    out = jax.nn.dot_product_attention(**args, implementation="xla")
    assert rel(out, numpy_reference(q, k, v, pos, seg, window)) < 1e-5
    without = {key: a for key, a in args.items() if key != "mask"}  # what a path dropping segment ids computes
    leak = jax.nn.dot_product_attention(**without, implementation="xla")
    assert rel(leak, numpy_reference(q, k, v, pos, seg, window)) > 1e-2


def test_index_masks_need_consecutive_positions():
    pos, seg = packed_rows()
    assert attention.positions_consecutive(pos, seg)
    assert attention.positions_consecutive(np.arange(T)[None] + 5)
    assert not attention.positions_consecutive(np.zeros((1, T), np.int32))  # e.g. left padding at position 0


def test_resolve():
    kw = dict(seq_len=8192, head_dim=64, dtype=jnp.bfloat16)
    assert attention.resolve("auto", platform="tpu", **kw) == "splash"
    assert attention.resolve("auto", platform="gpu", **kw) == "cudnn"
    assert attention.resolve("auto", platform="gpu", soft_cap=30.0, **kw) == "xla"  # cuDNN cannot soft-cap
    assert attention.resolve("auto", platform="gpu", **{**kw, "dtype": jnp.float32}) == "xla"
    assert attention.resolve("auto", platform="cpu", **kw) == "xla"
    assert attention.resolve("auto", platform="tpu", **{**kw, "seq_len": 1000}) == "xla"  # no block divides it
    assert attention.resolve("auto", **kw) == "xla"  # this CPU
    with pytest.raises(ValueError, match="unknown attention"):
        attention.resolve("flash", **kw)
    with pytest.raises(ValueError, match="attention"):
        model_lib.ModelConfig(8, 8, 1, 1, 1, 8, 8, attention="flash")


TINY = model_lib.ModelConfig(
    vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=64, n_loops=2, rank_attn=4,
    rank_mlp=4, per_position_norms=True,
)  # fmt: skip


# sequence runs the same kernels with other layer ids: slow, to keep this file's default run under ~90 s
# Gemma 3's switches: local and global positions alternate within each shared layer's loops (a traced flag).
GEMMA3 = dict(
    norm_position="sandwich",
    qk_norm="head",
    layer_types=("sliding_attention", "full_attention", "full_attention", "sliding_attention"),
    sliding_window=16,
    rope_local_theta=500.0,
    attn_soft_cap=5.0,
    query_scalar=12.0,
)


@pytest.mark.parametrize(
    "strategy, switches",
    [
        ("cycle", {}),
        pytest.param("sequence", {}, marks=pytest.mark.slow),
        pytest.param("cycle", GEMMA3, marks=pytest.mark.slow),
    ],
    ids=["cycle", "sequence", "cycle-gemma3"],
)
def test_model_splash_equals_xla(strategy, switches):
    pos, seg = packed_rows()
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, (B, T))
    out = {}
    for kind in ("xla", "splash"):
        cfg = dataclasses.replace(TINY, strategy=strategy, attention=kind, **switches)
        graphdef, params = nnx.split(model_lib.Decoder(cfg, rngs=nnx.Rngs(0)))
        params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)  # LoRA B != 0

        def loss(params, graphdef=graphdef):
            logits = nnx.merge(graphdef, params)(tokens, pos, seg)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        out[kind] = jax.jit(jax.value_and_grad(loss))(params)
    (lx, gx), (ls, gs) = out["xla"], out["splash"]
    assert rel(ls, lx) < 1e-5
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gx)):
        assert rel(a, b) < 1e-4


SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
import attention_test as t
from rrt import attention, sharding
mesh = sharding.make_mesh((1, 2, 2))  # rows over fsdp, heads (4 query, 2 key/value) over tensor
pos, seg = t.packed_rows()
q, k, v = t.qkv(4, 2)
def f(kind):
    def loss(q, k, v):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            out = attention.self_attention(q, k, v, pos, seg, kind=kind)
        return jnp.sum(out * out)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
put = lambda a: jax.device_put(a, jax.NamedSharding(mesh, jax.P("fsdp", None, "tensor", None)))
(lx, gx), (ls, gs) = f("xla")(*map(put, (q, k, v))), f("splash")(*map(put, (q, k, v)))
assert "shard_map" in str(jax.make_jaxpr(f("splash"))(q, k, v))
print("ERR", max([t.rel(ls, lx)] + [t.rel(a, b) for a, b in zip(gs, gx)]))
"""


def test_splash_sharded_over_rows_and_heads_equals_xla():
    """4 fake devices (a subprocess: device counts are fixed before JAX starts): splash in its shard_map, rows over
    fsdp and heads over tensor, equals xla in value and gradients."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    err = float(out.stdout.split("ERR")[-1])
    assert err < 1e-5
