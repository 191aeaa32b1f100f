"""Generation with a KV cache per depth position: prefill, decode steps, sampling, static batching.

Design notes.
* The cache holds one entry per depth position l = r*K + k ({k, v}: [L, B, S, G, H], `model.init_cache`): a shared
  layer visited in several loops sees different inputs each time, so its keys and values differ per visit. Key
  slot s holds absolute position s; each row writes at its own position, so a batch of prompts of different
  lengths is right-padded and every row then decodes at its own position (padding entries are overwritten
  before any query can see them: the mask admits keys at positions <= the query's).
* Every shape is static: prompts are padded to a multiple of `PAD`, the cache length S is fixed per call, the batch
  is padded with dummy rows, so a run compiles one prefill and one step function.
* Prefill runs full depth (`model.stack`); each decode step is either full depth or early exit
  (`rrt.decode.early_exit.step`, the batch waits for its slowest token). Both run the loops with `early_exit.run_loop`,
  which scatters only each token's new k/v: `model.stack` passes the cache through its scans as xs/ys and so
  rewrites all of it every step (measured on SmolLM2 15 x 2, 8 rows, CPU: 248 ms vs 194 ms per step).
* Sampling (greedy, temperature, top-k, top-p) draws token i of request n with the key fold_in(fold_in(seed, n), i),
  so a request's tokens do not depend on which batch or engine slot decoded it (`rrt.decode.depthwise` relies on this).
* Functions on arrays are pure and module-level; the model enters as (graphdef, state) and is merged inside jit.
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrt import model as model_lib
from rrt.decode import early_exit

PAD = 16  # prompts are padded to a multiple of this many tokens


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling: need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self}")


GREEDY = Sampling()


def sample(sampling: Sampling, logits_BxV: jax.Array, keys_B: jax.Array) -> jax.Array:
    """int32[B] tokens: argmax, or a draw after temperature, top-k and top-p (nucleus) filtering."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        keep = before < sampling.top_p  # the smallest prefix reaching top_p (the first token always kept)
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.vmap(jax.random.categorical)(keys_B, logits).astype(jnp.int32)


def token_keys(seed: int, request_ids_B: jax.Array, counts_B: jax.Array) -> jax.Array:
    """The key of token `count` of request `request_id`, per row."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r, c: jax.random.fold_in(jax.random.fold_in(base, r), c))(request_ids_B, counts_B)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "seed"), donate_argnames=("cache",))
def prefill(graphdef, state, tokens_BxT, lengths_B, request_ids_B, cache, *, sampling: Sampling, seed: int):
    """Full-depth pass over right-padded prompts; returns (first tokens [B], their logits [B, V], cache)."""
    m = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    x, _, cache = model_lib.stack(m.cfg, m.weights(), m.embed_tokens(tokens_BxT), positions, None, cache)
    logits = m.logits_rows(x[jnp.arange(x.shape[0]), lengths_B - 1])
    keys = token_keys(seed, request_ids_B, jnp.zeros_like(request_ids_B))
    return sample(sampling, logits, keys), logits, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "seed", "rule"), donate_argnames=("cache",))
def decode_step(
    graphdef,
    state,
    tokens_B,
    positions_B,
    active_B,
    request_ids_B,
    counts_B,
    cache,
    *,
    sampling: Sampling,
    seed: int,
    rule: early_exit.ExitRule | None,
):
    """Feeds one token per row at its position; returns (next tokens [B], their logits [B, V], loops used [B],
    cache). `rule=None` runs full depth; otherwise tokens exit early (`early_exit.step`)."""
    m = nnx.merge(graphdef, state)
    if rule is None:
        weights, r_count = m.weights(), m.cfg.n_loops
        x = m.embed_tokens(tokens_B[:, None])[:, 0]
        x, cache = jax.lax.fori_loop(
            0, r_count, lambda r, c: early_exit.run_loop(m.cfg, weights, c[0], r, positions_B, c[1]), (x, cache)
        )
        logits, loops = m.logits_rows(x), jnp.full(tokens_B.shape, r_count, jnp.int32)
    else:
        logits, loops, cache = early_exit.step(m, rule, tokens_B, positions_B, active_B, cache)
    tokens = sample(sampling, logits, token_keys(seed, request_ids_B, counts_B))
    return tokens, logits, loops, cache


@dataclasses.dataclass
class Generation:
    """Per request: generated tokens (EOS included if produced) and the loops each one used (prefill: R)."""

    tokens: list[list[int]]
    loops: list[list[int]]
    logits: list[np.ndarray] | None = None  # [N, V] per request, when asked for
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # wall clock
    decode_cpu_seconds: float = 0.0  # this process's CPU time over the same span (all threads)
    steps: int = 0  # depth-wise engine only: engine steps run, and slot-steps that held a request
    busy_slot_steps: int = 0


def padded_prompts(prompts: list[list[int]], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded tokens [rows, T] (T a multiple of PAD) and lengths [rows]; missing rows copy the first."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    t = -(-max(len(p) for p in prompts) // PAD) * PAD
    tokens = np.zeros((rows, t), np.int32)
    lengths = np.zeros((rows,), np.int32)
    for i in range(rows):
        p = prompts[min(i, len(prompts) - 1)] if i < len(prompts) else prompts[0]
        tokens[i, : len(p)], lengths[i] = p, len(p)
    return tokens, lengths


def cache_length(prompts: list[list[int]], max_new_tokens: int) -> int:
    """A cache long enough for the padded prompts and every new token, rounded up to a multiple of 64."""
    need = max(-(-max(len(p) for p in prompts) // PAD) * PAD, max(len(p) for p in prompts) + max_new_tokens)
    return -(-need // 64) * 64


def check_length(prompts: list[list[int]], max_new_tokens: int, max_len: int) -> None:
    longest = max(len(p) for p in prompts)
    if max_len < max(-(-longest // PAD) * PAD, longest + max_new_tokens):
        raise ValueError(f"cache length {max_len} is too short for a {longest}-token prompt + {max_new_tokens} tokens")


def generate(
    model: model_lib.Decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    rule: early_exit.ExitRule | None = None,
    eos_id: int | None = None,
    batch_size: int | None = None,
    max_len: int | None = None,
    request_ids: list[int] | None = None,
    return_logits: bool = False,
    cache_dtype=jnp.float32,
) -> Generation:
    """Static batching: prompts are decoded `batch_size` at a time, each batch until all its rows are done.
    A request's tokens (its keys are fold_in(seed, request_ids[i])) do not depend on the batching."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    n = len(prompts)
    batch_size = batch_size or n
    max_len = max_len or cache_length(prompts, max_new_tokens)
    check_length(prompts, max_new_tokens, max_len)
    request_ids = list(range(n)) if request_ids is None else list(request_ids)
    graphdef, state = nnx.split(model)
    out = Generation([[] for _ in range(n)], [[] for _ in range(n)], [] if return_logits else None)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        tokens_BxT, lengths = padded_prompts([prompts[i] for i in idx], batch_size)
        rids = np.array([request_ids[i] for i in idx] + [0] * (batch_size - len(idx)), np.int32)
        cache = model_lib.init_cache(model.cfg, batch_size, max_len, cache_dtype)
        t0 = time.perf_counter()
        tok, logits, cache = prefill(graphdef, state, tokens_BxT, lengths, rids, cache, sampling=sampling, seed=seed)
        tok.block_until_ready()
        t1, c1 = time.perf_counter(), time.process_time()
        toks, loops, all_logits = [tok], [np.full(batch_size, model.cfg.n_loops)], [logits]
        active = np.arange(batch_size) < len(idx)
        done = ~active | (np.asarray(tok) == eos_id if eos_id is not None else False)
        for i in range(1, max_new_tokens):
            if done.all():
                break
            tok, logits, used, cache = decode_step(
                graphdef, state, tok, jnp.asarray(lengths + i - 1), jnp.asarray(~done), rids,
                jnp.full(batch_size, i, jnp.int32), cache, sampling=sampling, seed=seed, rule=rule,
            )  # fmt: skip
            toks.append(tok)
            loops.append(used)
            all_logits.append(logits)
            if eos_id is not None:  # the only per-token host sync, and only when EOS can stop rows early
                done = done | (np.asarray(tok) == eos_id)
        toks_NxB = np.stack([np.asarray(t) for t in toks])
        t2, c2 = time.perf_counter(), time.process_time()
        loops_NxB = np.stack([np.asarray(x) for x in loops])
        out.prefill_seconds += t1 - t0
        out.decode_seconds += t2 - t1
        out.decode_cpu_seconds += c2 - c1
        for j, i in enumerate(idx):
            seq = toks_NxB[:, j].tolist()
            if eos_id is not None and eos_id in seq:
                seq = seq[: seq.index(eos_id) + 1]
            out.tokens[i] = seq
            out.loops[i] = loops_NxB[: len(seq), j].tolist()
            if return_logits:
                out.logits.append(np.stack([np.asarray(x)[j] for x in all_logits[: len(seq)]]))
    return out
