"""KV-cache decoding against the full forward pass, sampling filters, and the early-exit deep-KV policy.

Tiny random models with weights drawn large enough that logits are peaked (near-uniform logits would hide errors
and make greedy ties likely)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rrt import lora
from rrt import model as model_lib
from rrt.decode import cache as decode
from rrt.decode import early_exit

TINY = model_lib.ModelConfig(
    vocab_size=64, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, n_loops=3
)
NEW = 6


def tiny(strategy: str = "cycle", rank: int = 0, seed: int = 0, **extra) -> model_lib.Decoder:
    """A random recursive model with peaked logits: embeddings ~ N(0, 1), kernels and LoRA factors ~ N(0, 0.3),
    norm weights 1 + N(0, 0.2) that vary per position (so a wrong position index shows). Drawn with numpy: eager
    `Decoder.__init__` compiles every random op and is slow on CPU."""
    cfg = dataclasses.replace(
        TINY, strategy=strategy, rank_attn=rank, rank_mlp=rank, per_position_norms=rank > 0, **extra
    )
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in model_lib.param_shapes(cfg).items():
        if name == "embed":
            params[name] = rng.normal(0, 1.0, shape)
        elif len(shape) == 3:
            params[name] = rng.normal(0, 0.3, shape)
        else:
            params[name] = 1 + 0.2 * rng.normal(size=shape)
    return model_lib.from_params(cfg, {k: v.astype(np.float32) for k, v in params.items()})


def forward(m: model_lib.Decoder, tokens_BxT) -> tuple[np.ndarray, np.ndarray]:
    """Full forward pass without a cache (jitted): logits [B, T, V] and loop hiddens [R, B, T, D]."""
    graphdef, state = nnx.split(m)
    fn = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t, return_loop_hiddens=True))
    logits, hiddens = fn(state, jnp.asarray(tokens_BxT))
    return np.asarray(logits), np.asarray(hiddens)


def prompts(seed: int = 1, lengths=(5, 9, 3, 12)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, TINY.vocab_size, n).tolist() for n in lengths]


def rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("strategy,rank", [("cycle", 0), ("sequence", 0), ("cycle", 4), ("sequence", 4)])
def test_cached_decoding_equals_full_forward(strategy, rank):
    m = tiny(strategy, rank)
    ps = prompts()
    out = decode.generate(m, ps, NEW, return_logits=True)
    seqs, _ = decode.padded_prompts([p + t[:-1] for p, t in zip(ps, out.tokens)], len(ps))  # causal: padding is inert
    full_BxTxV, _ = forward(m, seqs)
    for p, toks, logits, full in zip(ps, out.tokens, out.logits, full_BxTxV):
        full = full[len(p) - 1 : len(p) - 1 + NEW]
        assert rel_error(logits, full) < 1e-5
        assert toks == np.argmax(full, axis=-1).tolist()


@pytest.mark.parametrize("kind", ["max_prob", "cosine"])
def test_never_firing_exit_is_full_depth(kind):
    m = tiny("cycle", 4)
    ps = prompts()
    full = decode.generate(m, ps, NEW, return_logits=True)
    never = decode.generate(m, ps, NEW, rule=early_exit.ExitRule(kind, 1.5), return_logits=True)
    assert never.tokens == full.tokens
    assert all(x == [m.cfg.n_loops] * NEW for x in never.loops)
    for a, b in zip(never.logits, full.logits):
        assert rel_error(a, b) < 1e-5


@pytest.mark.parametrize("strategy", ["cycle", "sequence"])
def test_cosine_exit_follows_the_hidden_states(strategy):
    """The first decoded token of each prompt sees only the prefill's full-depth cache, so its states after each
    loop are the full forward's. It must exit at the first loop whose output has cosine >= 0.8 with that loop's
    input (loop 1's input: the embedding), computed here in numpy, and its logits must be the head of that state."""
    m = tiny(strategy, 4, seed=2)
    ps = prompts(5, (4, 6, 3, 9, 5, 7, 8, 2, 11, 6, 5, 10))
    threshold = 0.8
    out = decode.generate(m, ps, 2, rule=early_exit.ExitRule("cosine", threshold), return_logits=True)
    seqs, _ = decode.padded_prompts([p + t[:1] for p, t in zip(ps, out.tokens)], len(ps))
    full_logits, hiddens = forward(m, seqs)
    embed = np.asarray(model_lib.flat_params(m)["embed"])
    want_loops = []
    for i, p in enumerate(ps):
        t = len(p)  # the first decoded token's position
        states = [embed[seqs[i, t]]] + [hiddens[r, i, t] for r in range(m.cfg.n_loops)]
        cos = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(states[1:], states[:-1])]
        exit_loop = next((r + 1 for r, c in enumerate(cos) if c >= threshold), m.cfg.n_loops)
        want_loops.append(exit_loop)
        exit_logits = np.asarray(m.logits(jnp.asarray(hiddens[exit_loop - 1, i, t])))
        assert rel_error(out.logits[i][1], exit_logits) < 1e-5
    assert [x[1] for x in out.loops] == want_loops
    assert len(set(want_loops)) > 1, "the threshold should give mixed depths"


@pytest.mark.parametrize("tied", [True, False])
def test_logits_rows_is_the_head(tied):
    """The decoding head ([V, N] then transposed) gives `logits`' values (checked against HF in hf_parity_test)."""
    m = tiny("cycle", 4, tie_embeddings=tied)
    for n in (1, 3, 8):
        x = jax.random.normal(jax.random.key(n), (n, m.cfg.d_model))
        np.testing.assert_allclose(jax.jit(m.logits_rows)(x), m.logits(x), rtol=1e-5, atol=1e-5)


def test_exit_logits_runs_the_head_for_the_chosen_rows():
    m = tiny("cycle", 4)
    x = jax.random.normal(jax.random.key(0), (8, m.cfg.d_model))
    full = np.asarray(m.logits(x))
    fn = jax.jit(lambda x, rows: early_exit.exit_logits(m, x, rows))
    rng = np.random.default_rng(0)
    for count in (0, 1, 2, 3, 5, 8):
        rows = np.zeros(8, bool)
        rows[rng.choice(8, count, replace=False)] = True
        got = np.asarray(fn(x, jnp.asarray(rows)))
        np.testing.assert_allclose(got[rows], full[rows], rtol=1e-5, atol=1e-5)
        computed = int((np.abs(got).sum(-1) > 0).sum())  # the head ran on the smallest bucket holding the rows
        assert computed == min([n for n in (1, 2, 4, 8) if n >= count], default=0) if count else computed == 0
    assert early_exit.head_buckets(8) == (1, 2, 4, 8) and early_exit.head_buckets(6) == (1, 2, 4, 6)


@pytest.mark.parametrize("strategy", ["cycle", "sequence"])
def test_deep_kv_of_exited_tokens_follow_the_policy(strategy):
    """Threshold 0: every decoded token exits after loop 1. Its hidden state there is the full forward's loop-1
    state (loop 1 only reads loop-1 keys), and every deeper position's k/v must be that state projected with the
    position's own weights (computed here from merged LoRA kernels)."""
    m = tiny(strategy, 4)
    cfg, (r_count, k_count) = m.cfg, (m.cfg.n_loops, m.cfg.n_shared)
    prompt, fed = prompts(lengths=(7,))[0], [3, 17, 42]
    graphdef, state = nnx.split(m)
    cache = model_lib.init_cache(cfg, 1, 64)
    tokens_1xT, lengths = decode.padded_prompts([prompt], 1)
    zero = jnp.zeros((1,), jnp.int32)
    _, _, cache = decode.prefill(graphdef, state, tokens_1xT, lengths, zero, cache, sampling=decode.Sampling(), seed=0)
    for i, t in enumerate(fed):
        _, _, loops, cache = decode.decode_step(
            graphdef, state, jnp.array([t]), jnp.array([len(prompt) + i]), jnp.array([True]), zero, zero, cache,
            sampling=decode.Sampling(), seed=0, rule=early_exit.ExitRule("max_prob", 0.0),
        )  # fmt: skip
        assert int(loops[0]) == 1
    _, hiddens = forward(m, [prompt + fed])
    h_TxD = hiddens[0, 0, len(prompt) :]  # loop-1 states of the fed tokens
    params = model_lib.flat_params(m)
    ids = cfg.layer_ids().reshape(-1)
    positions = jnp.arange(len(prompt), len(prompt) + len(fed))[None]

    @jax.jit
    def policy(params, h_TxD, l, layer):  # position l's k/v of h, from merged kernels W + s a b
        h = model_lib.norm(cfg, h_TxD[None], params["relax/attn_norm"][l])
        out = []
        for p in ("k", "v"):
            a, b = params[f"relax/{p}_a"][l], params[f"relax/{p}_b"][l]
            kernel = lora.merge(params[f"layers/{p}"][layer], a, b, cfg.lora_scale(p))
            out.append((h @ kernel).reshape(1, len(fed), cfg.n_kv_heads, cfg.head_dim))
        return model_lib.rope(cfg, out[0], positions), out[1]

    got = slice(len(prompt), len(prompt) + len(fed))
    for l in range(k_count, cfg.n_layers):  # every position of loops 2..R
        want_k, want_v = policy(params, h_TxD, l, ids[l])
        np.testing.assert_allclose(cache["k"][l, :, got], want_k, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(cache["v"][l, :, got], want_v, rtol=1e-5, atol=1e-5)
    assert r_count == 3


def test_kv_projection_is_what_the_block_writes():
    m = tiny("cycle", 4)
    cfg = m.cfg
    w = m.weights()
    l = 4
    wl = {
        **model_lib.shared_layer(w["layers"], cfg.layer_ids().reshape(-1)[l]),
        **{n: v[l] for n, v in w["relax"].items()},
    }
    x = jax.random.normal(jax.random.key(0), (2, 1, cfg.d_model))
    pos = jnp.array([[3], [7]])
    cache = {n: jnp.zeros((2, 16, cfg.n_kv_heads, cfg.head_dim)) for n in ("k", "v")}
    _, written = jax.jit(lambda w, x, c: model_lib.block(cfg, w, x, pos, None, c))(wl, x, cache)
    k, v = jax.jit(lambda w, x: early_exit.kv_projection(cfg, w, x, pos))(wl, x)
    rows = jnp.arange(2)
    np.testing.assert_allclose(written["k"][rows, pos[:, 0]], k[:, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(written["v"][rows, pos[:, 0]], v[:, 0], rtol=1e-6, atol=1e-6)


def test_sampling_filters():
    sample = jax.jit(decode.sample, static_argnums=0)
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = decode.token_keys(0, jnp.arange(2000), jnp.zeros(2000, jnp.int32))
    greedy = sample(decode.Sampling(), logits, keys)
    assert (greedy == 0).all()
    assert (sample(decode.Sampling(1.0, top_k=1), logits, keys) == 0).all()
    top2 = np.asarray(sample(decode.Sampling(1.0, top_k=2), logits, keys))
    assert set(top2.tolist()) == {0, 1} and abs((top2 == 0).mean() - 0.5 / 0.8) < 0.05
    nucleus = np.asarray(sample(decode.Sampling(1.0, top_p=0.9), logits, keys))  # 0.5 + 0.3 + 0.15 >= 0.9
    assert set(nucleus.tolist()) == {0, 1, 2}
    free = np.asarray(sample(decode.Sampling(1.0), logits, keys))
    assert abs((free == 3).mean() - 0.05) < 0.02
    again = np.asarray(sample(decode.Sampling(1.0), logits, keys))
    assert (free == again).all()  # same keys, same draws


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france():
    from rrt import formats
    from rrt.formats import gguf
    from rrt.formats import tokenizer as tokenizer_lib

    path = gguf.smollm2_gguf_path()
    cfg, params = formats.load(path)
    tok = tokenizer_lib.load_tokenizer(path)
    out = decode.generate(model_lib.from_params(cfg, params), [tok.encode("The capital of France is")], 8)
    assert "Paris" in tok.decode(out.tokens[0])
