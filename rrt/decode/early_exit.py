"""Per-token early exit while decoding: exit rules, one loop at a time, and the deep-KV fill policy.

Exiting after loop r means applying the final norm and head to the hidden state after loop r (as `rrt.eval.scoring`
does); the token is drawn from those logits. Rules (`ExitRule`), checked after every loop, the last loop always exiting:
  max_prob   the exit's largest softmax probability >= threshold (a threshold > 1 never fires)
  agreement  the exit's argmax equals the previous loop's argmax (possible from loop 2 on)
  cosine     the loop barely turned the hidden state: cos(state after the loop, state before it) >= threshold (the
             state before loop 1 is the token embedding; a threshold > 1 never fires). It reads no logits, so the
             head runs only for the tokens that exit (`exit_logits`), once per token as at full depth, instead of
             after every loop for every token.

Deep-KV fill policy ("copy hidden state", CALM's state propagation). A token that exits after loop e never runs
the depth positions of loops e+1..R, yet later tokens attend to their keys and values at those positions. We fill
them as if every deeper layer were the identity: position l >= e*K gets
    k_l = rope(k_proj_l(norm_l(h_e))),   v_l = v_proj_l(norm_l(h_e))
with h_e the exit hidden state and k_proj_l, v_proj_l, norm_l position l's own weights (shared layer + its LoRA,
its per-position norm). This costs only the k and v projections (about 6% of a block for SmolLM2) of the skipped
positions, and it is batched: `fill_kv` walks the L positions once for all rows together, each row writing only
the positions of its own skipped loops (loops nobody needs are skipped with a `lax.cond`). Every decoding path
(static batching below, the depth-wise engine in `rrt.decode.depthwise`) fills with this one function, so they agree.

`run_loop` runs one loop (the K shared layers) for a batch in which each row may sit at its own loop index and
sequence position (see its docstring for how the per-position weights reach each row). With a scalar loop index
the weights are sliced once for all rows.
"""

import dataclasses

import jax
import jax.numpy as jnp

from rrt import model as model_lib

RULES = ("max_prob", "agreement", "cosine")


@dataclasses.dataclass(frozen=True)
class ExitRule:
    """When a token may leave after a loop (see the module docstring)."""

    kind: str = "max_prob"
    threshold: float = 0.9  # max_prob and cosine
    min_loops: int = 1  # never exit before this many loops

    def __post_init__(self):
        if self.kind not in RULES:
            raise ValueError(f"ExitRule: unknown kind {self.kind!r}; expected one of {RULES}")
        if self.min_loops < 1:
            raise ValueError(f"ExitRule: min_loops must be >= 1, got {self.min_loops}")

    @property
    def needs_logits(self) -> bool:
        """Whether the rule reads every loop's logits (then the head runs after every loop for every token)."""
        return self.kind != "cosine"


def cosine(a_BxD: jax.Array, b_BxD: jax.Array) -> jax.Array:
    """float32[B]: the cosine similarity of the rows (0 where either is zero)."""
    a, b = a_BxD.astype(jnp.float32), b_BxD.astype(jnp.float32)
    norms = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
    return jnp.sum(a * b, axis=-1) / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)


def confident(rule: ExitRule, loop, *, logits_BxV=None, prev_argmax_B=None, x_in_BxD=None, x_out_BxD=None):
    """bool[B]: whether the rule lets each row exit after 0-based loop `loop` (scalar or [B]). max_prob reads the
    loop's logits, agreement those and the previous loop's argmax, cosine the hidden states before and after."""
    if rule.kind == "max_prob":
        ok = jnp.max(jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1), axis=-1) >= rule.threshold
    elif rule.kind == "agreement":
        ok = (jnp.argmax(logits_BxV, axis=-1) == prev_argmax_B) & (loop >= 1)
    else:
        ok = cosine(x_in_BxD, x_out_BxD) >= rule.threshold
    return ok & (loop + 1 >= rule.min_loops)


def head_buckets(rows: int) -> tuple[int, ...]:
    """The row counts `exit_logits` compiles the head for: powers of two below `rows`, and `rows`."""
    sizes, n = [], 1
    while n < rows:
        sizes.append(n)
        n *= 2
    return tuple(sizes) + (rows,)


def exit_logits(model: model_lib.Decoder, x_BxD: jax.Array, rows_B: jax.Array) -> jax.Array:
    """float32[B, V]: the exit logits (final norm and head) of the rows where `rows_B` holds; other rows are zero.

    The head runs on those rows only, compacted to the smallest bucket (`head_buckets`) that holds them, the
    bucket chosen at run time by `lax.switch` (shapes stay static; only the taken branch runs); with no row, no
    head at all. A bucket larger than the count also computes a few other rows, which are then discarded."""
    b = x_BxD.shape[0]
    count = jnp.sum(rows_B.astype(jnp.int32))
    order = jnp.argsort(~rows_B, stable=True)  # the selected rows first, in row order
    zeros = jnp.zeros((b, model.cfg.vocab_size), jnp.float32)

    def bucket(n):
        def run():
            idx = order[:n]
            return zeros.at[idx].set(model.logits_rows(x_BxD[idx]))

        return run

    sizes = head_buckets(b)
    branch = jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes), count))
    return jax.lax.switch(branch, [lambda: zeros] + [bucket(n) for n in sizes])


def kv_projection(cfg: model_lib.ModelConfig, w: dict, x_BxTxD: jax.Array, positions_BxT: jax.Array):
    """The keys and values [B, T, G, H] that `model.block` with weights `w` writes for input x (same expressions)."""
    h = model_lib.attn_input(cfg, w, x_BxTxD)
    return tuple(model_lib.heads(cfg, w, name, h, positions_BxT) for name in "kv")


def _shared(cfg: model_lib.ModelConfig, weights: dict, dtype) -> dict:
    return {name: v.astype(dtype) for name, v in weights["layers"].items()}


def fill_kv(cfg: model_lib.ModelConfig, weights: dict, h_BxD, positions_B, from_loop_B, cache: dict) -> dict:
    """The deep-KV policy: each row's entry at its position, for every depth position of loops >= from_loop_B
    (0-based; R fills nothing), becomes k/v projected from its exit hidden state h_BxD."""
    r_count, k_count = cfg.n_loops, cfg.n_shared
    b = h_BxD.shape[0]
    shared = _shared(cfg, weights, h_BxD.dtype)
    ids = jnp.asarray(cfg.layer_ids().reshape(-1))
    empty = jnp.zeros((k_count, b, cfg.n_kv_heads, cfg.head_dim), h_BxD.dtype)

    def position(_, l):
        w = {**model_lib.shared_layer(shared, ids[l]), **{n: v[l] for n, v in weights["relax"].items()}}
        k_Bx1xGxH, v_Bx1xGxH = kv_projection(cfg, w, h_BxD[:, None], positions_B[:, None])
        return None, (k_Bx1xGxH[:, 0], v_Bx1xGxH[:, 0])

    def loop(_, r):  # a loop that no row needs is skipped
        run = lambda: jax.lax.scan(position, None, r * k_count + jnp.arange(k_count))[1]  # noqa: E731
        return None, jax.lax.cond(jnp.any(from_loop_B <= r), run, lambda: (empty, empty))

    _, (k_RxKxBxGxH, v_RxKxBxGxH) = jax.lax.scan(loop, None, jnp.arange(r_count))
    depth = jnp.arange(cfg.n_layers)[:, None]  # the cache is not a scan carry: one masked scatter at the end
    write = (depth // k_count >= from_loop_B[None, :])[..., None, None]  # [L, B, 1, 1]
    rows = jnp.arange(b)[None, :]
    out = {}
    for name, new in (("k", k_RxKxBxGxH), ("v", v_RxKxBxGxH)):
        a = cache[name]
        old = a[depth, rows, positions_B[None, :]]  # [L, B, G, H]
        new = new.reshape(old.shape).astype(a.dtype)
        out[name] = a.at[depth, rows, positions_B[None, :]].set(jnp.where(write, new, old))
    return out


def run_loop(cfg: model_lib.ModelConfig, weights: dict, x_BxD, loop, positions_B, cache: dict):
    """One loop (K depth positions) for every row: `loop` is a scalar or each row's own 0-based loop index [B];
    returns (x_BxD, cache) with each row's new k/v written at (its depth position, its row, its position).

    The loop's K cache rows are gathered once and scanned over (the K positions' caches are distinct, so no
    position reads what another writes); only the new entries are scattered back, so the whole cache is never
    a scan carry (which would make XLA copy it at every position). Per-row loops (`cycle`): the shared kernels are
    those of layer k for every row; the LoRA factors of position k in all R loops go in stacked, each row picking
    its loop by a one-hot `lora_group` (`lora.delta`: no per-row copies of the factors); per-position vectors are
    gathered per row. Per-row loops with `sequence` (the layer depends on the loop) vmap the block over rows, each
    gathering its own layer: correct, but it copies every row's weights."""
    k_count, r_count = cfg.n_shared, cfg.n_loops
    b = x_BxD.shape[0]
    per_row = jnp.ndim(loop) == 1
    shared = _shared(cfg, weights, x_BxD.dtype)
    ids = jnp.asarray(cfg.layer_ids().reshape(-1))
    rows = jnp.arange(b)
    start_B = loop * k_count if per_row else jnp.full((b,), loop * k_count)
    depth_KxB = jnp.arange(k_count)[:, None] + start_B[None, :]
    if per_row:
        cache_K = {n: a[depth_KxB, rows[None, :]] for n, a in cache.items()}  # [K, B, S, G, H]
    else:
        cache_K = {n: jax.lax.dynamic_slice_in_dim(a, loop * k_count, k_count) for n, a in cache.items()}
    grouped = per_row and (cfg.strategy == "cycle" or k_count == 1)  # every row uses layer k at step k
    vectors = set(cfg.norm_names() + cfg.bias_names())
    group_BxR = jax.nn.one_hot(loop, r_count, dtype=x_BxD.dtype) if per_row else None

    def one_row(w, x_D, pos, c):
        y, c_new = model_lib.block(cfg, w, x_D[None, None], pos[None, None], None, {n: a[None] for n, a in c.items()})
        return y[0, 0], {n: a[0, pos] for n, a in c_new.items()}

    def position(x, xs):
        k, cache_l = xs
        l = loop * k_count + k  # [B] or scalar
        if not per_row:
            w = {**model_lib.shared_layer(shared, ids[l]), **{n: v[l] for n, v in weights["relax"].items()}}
        elif grouped:
            w = {**model_lib.shared_layer(shared, k), "lora_group": group_BxR}
            for n, v in weights["relax"].items():
                if n in vectors or n in model_lib.POSITION_CONSTANTS:  # per row: norms [B, D], the kind [B],
                    w[n] = v[l][:, None] if n in cfg.bias_names() else v[l]  # projection biases [B, 1, O]
                else:  # LoRA factors of position k in every loop: [R, ...]
                    w[n] = jax.lax.dynamic_index_in_dim(v.reshape((r_count, k_count) + v.shape[1:]), k, 1, False)
        else:
            w = {**{n: v[ids[l]] for n, v in shared.items()}, **{n: v[l] for n, v in weights["relax"].items()}}
            return jax.vmap(one_row)(w, x, positions_B, cache_l)
        y, c_new = model_lib.block(cfg, w, x[:, None], positions_B[:, None], None, cache_l)
        return y[:, 0], {n: a[rows, positions_B] for n, a in c_new.items()}

    x_BxD, entries = jax.lax.scan(position, x_BxD, (jnp.arange(k_count), cache_K))  # entries [K, B, G, H]
    pos = positions_B[None, :]
    cache = {n: a.at[depth_KxB, rows[None, :], pos].set(entries[n].astype(a.dtype)) for n, a in cache.items()}
    return x_BxD, cache


def step(model: model_lib.Decoder, rule: ExitRule, tokens_B, positions_B, active_B, cache: dict):
    """One token per row with early exit, static batching: loops run for the whole batch until every active row
    has exited (the batch waits for its slowest token); exited rows keep their hidden state. Then the deep KV of
    every row is filled by the policy. A rule that reads logits runs the head after every loop; `cosine` runs it
    once, on the exit states. Returns (exit logits [B, V], loops used [B], cache)."""
    cfg = model.cfg
    r_count = cfg.n_loops
    weights = model.weights()
    x = model.embed_tokens(tokens_B[:, None])[:, 0]
    b = x.shape[0]

    def cond(c):
        r, _, done = c[0], c[1], c[2]
        return (r < r_count) & ~jnp.all(done)

    def body(c):
        r, x, done, loops, out_logits, prev, cache = c
        y, cache = run_loop(cfg, weights, x, r, positions_B, cache)
        if rule.needs_logits:
            x = jnp.where(done[:, None], x, y)
            logits = model.logits_rows(x)
            fire = confident(rule, r, logits_BxV=logits, prev_argmax_B=prev)
            prev = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            fire = confident(rule, r, x_in_BxD=x, x_out_BxD=y)
            x = jnp.where(done[:, None], x, y)
        fire |= r == r_count - 1
        new = fire & ~done
        if rule.needs_logits:
            out_logits = jnp.where(new[:, None], logits, out_logits)
        loops = jnp.where(new, r + 1, loops)
        return r + 1, x, done | fire, loops, out_logits, prev, cache

    init = (
        jnp.int32(0),
        x,
        ~active_B,
        jnp.full((b,), r_count, jnp.int32),
        jnp.zeros((b, cfg.vocab_size) if rule.needs_logits else (b, 0), jnp.float32),
        jnp.full((b,), -1, jnp.int32),
        cache,
    )
    _, x, _, loops, logits, _, cache = jax.lax.while_loop(cond, body, init)
    if not rule.needs_logits:  # the head once, on every row's exit state
        logits = model.logits_rows(x)
    cache = fill_kv(cfg, weights, x, positions_B, loops, cache)
    return logits, loops, cache
