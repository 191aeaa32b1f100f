"""Continuous depth-wise batching: a fixed set of slots, each at its own loop and position, one shared loop per step.

A recursive model applies the same K shared layers in every loop, so tokens at different depths can share one pass
through them. The engine keeps `slots` rows; one engine step runs one loop (`early_exit.run_loop`) for all of them,
each row at its own loop index r and sequence position, with its own per-position weights (LoRA factors,
per-position norms: the [L, ...] stacks are viewed as [R, K, ...] and row b gathers loop r_b). After the loop, the
exit rule is checked per row; a row whose token exits (or finishes loop R) emits it, and the request's next token
enters the same row at loop 1 on the next step. A rule that reads logits (max_prob, agreement) needs the head for
every row after every step; `cosine` decides from the hidden states, and the head then runs only for the rows that
exit (`early_exit.exit_logits`: compacted to a bucket of rows, none when no row exits). A finished request frees
its row, and the next queued request takes it: its prompt is prefilled separately at full depth (batch 1,
`decode.prefill`), its cache rows copied in, and its first token (drawn from the prefill's logits) enters at loop 1
at once.

Deep KV of an exited token is filled by `early_exit.fill_kv` at the start of the next step (only positions of
loops > its exit loop; its successor at loop 1 needs none of them yet). Static shapes throughout: slots, cache length
and prompt buckets are fixed, so one step function compiles once. `n_steps` steps run per device call (a `lax.scan`);
rows that finish mid-call go idle until the host admits a new request after the call. Sampling keys depend only on
(request, token index), and each request's decoding sees exactly what it would see decoded alone with
`decode.generate(..., rule=...)`: same cache contents, same exit decisions, same tokens (tested, greedy).

State (one dict of arrays, donated every call): cache {k, v} [L, B, S, G, H]; x [B, D] hidden state; token, loop
(next 0-based loop), pos, prev (last loop's argmax), active, remaining (tokens still allowed), rid, count (tokens
emitted so far) per row; fill_h [B, D], fill_pos, fill_from (0-based first loop to fill; R: none) for the pending
deep-KV fill.
"""

import collections
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrt import model as model_lib
from rrt.decode import cache as decode
from rrt.decode import early_exit


def init_state(cfg: model_lib.ModelConfig, slots: int, max_len: int, cache_dtype=jnp.float32) -> dict:
    """Every slot empty."""
    ints = lambda value=0: jnp.full((slots,), value, jnp.int32)  # noqa: E731  (distinct buffers: all are donated)
    hidden = lambda: jnp.zeros((slots, cfg.d_model), jnp.dtype(cfg.dtype))  # noqa: E731
    return {
        "cache": model_lib.init_cache(cfg, slots, max_len, cache_dtype),
        "x": hidden(),
        "token": ints(),
        "loop": ints(),
        "pos": ints(),
        "prev": ints(-1),
        "active": jnp.zeros((slots,), bool),
        "remaining": ints(),
        "rid": ints(),
        "count": ints(),
        "fill_h": hidden(),
        "fill_pos": ints(),
        "fill_from": ints(cfg.n_loops),
    }


def step(m: model_lib.Decoder, es: dict, rule: early_exit.ExitRule, sampling, seed: int, eos_id: int | None):
    """One engine step: pending deep-KV fills, one loop for every slot, exits. Returns (state, emitted [B],
    tokens [B], loops used [B])."""
    cfg, weights = m.cfg, m.weights()
    r_count = cfg.n_loops
    cache = early_exit.fill_kv(cfg, weights, es["fill_h"], es["fill_pos"], es["fill_from"], es["cache"])
    entering = es["loop"] == 0
    x_in = jnp.where(entering[:, None], m.embed_tokens(es["token"][:, None])[:, 0], es["x"])
    x, cache = early_exit.run_loop(cfg, weights, x_in, es["loop"], es["pos"], cache)
    last = es["loop"] == r_count - 1
    if rule.needs_logits:  # the head for every slot
        logits = m.logits_rows(x)
        emit = early_exit.confident(rule, es["loop"], logits_BxV=logits, prev_argmax_B=es["prev"]) | last
        emit &= es["active"]
        prev = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:  # decide from the hidden states, then the head for the exiting slots only
        emit = (early_exit.confident(rule, es["loop"], x_in_BxD=x_in, x_out_BxD=x) | last) & es["active"]
        logits, prev = early_exit.exit_logits(m, x, emit), es["prev"]
    tok = decode.sample(sampling, logits, decode.token_keys(seed, es["rid"], es["count"]))
    finished = emit & (es["remaining"] <= 1)
    if eos_id is not None:
        finished |= emit & (tok == eos_id)
    new = {
        "cache": cache,
        "x": x,
        "token": jnp.where(emit, tok, es["token"]),
        "loop": jnp.where(emit | ~es["active"], 0, es["loop"] + 1),
        "pos": es["pos"] + emit,
        "prev": prev,
        "active": es["active"] & ~finished,
        "remaining": es["remaining"] - emit,
        "rid": es["rid"],
        "count": es["count"] + emit,
        "fill_h": jnp.where(emit[:, None], x, es["fill_h"]),
        "fill_pos": jnp.where(emit, es["pos"], es["fill_pos"]),
        "fill_from": jnp.where(emit, es["loop"] + 1, r_count),
    }
    return new, emit, tok, es["loop"] + 1


@functools.partial(
    jax.jit, static_argnames=("graphdef", "rule", "sampling", "seed", "eos_id", "n_steps"), donate_argnames=("es",)
)
def steps(graphdef, state, es: dict, *, rule, sampling, seed: int, eos_id: int | None, n_steps: int):
    """`n_steps` engine steps; returns (state, emitted [N, B], tokens [N, B], loops used [N, B])."""
    m = nnx.merge(graphdef, state)

    def one(es, _):
        es, emit, tok, loops = step(m, es, rule, sampling, seed, eos_id)
        return es, (emit, tok, loops)

    es, (emit, tok, loops) = jax.lax.scan(one, es, None, length=n_steps)
    return es, emit, tok, loops


@functools.partial(jax.jit, static_argnames=("n_loops",), donate_argnames=("es",))
def admit(es: dict, slot, cache_1: dict, token, pos, rid, remaining, *, n_loops: int) -> dict:
    """Puts a prefilled request into `slot`: its cache rows, its first token entering at loop 1."""
    cache = {n: jax.lax.dynamic_update_slice(es["cache"][n], cache_1[n], (0, slot, 0, 0, 0)) for n in es["cache"]}
    values = {"token": token, "loop": 0, "pos": pos, "prev": -1, "active": True, "remaining": remaining,
              "rid": rid, "count": 1, "fill_from": n_loops}  # fmt: skip
    return {**es, "cache": cache, **{n: es[n].at[slot].set(v) for n, v in values.items()}}


def generate(
    model: model_lib.Decoder,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    *,
    slots: int,
    rule: early_exit.ExitRule,
    sampling: decode.Sampling = decode.GREEDY,
    seed: int = 0,
    eos_id: int | None = None,
    max_len: int | None = None,
    n_steps: int = 1,
    cache_dtype=jnp.float32,
) -> decode.Generation:
    """Serves every prompt through `slots` rows (requests admitted in order as rows free up). Request i's keys are
    fold_in(seed, i), as in `decode.generate`. Returns the same record as `decode.generate`."""
    cfg = model.cfg
    n = len(prompts)
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != n or min(budgets) < 1:
        raise ValueError("max_new_tokens must be >= 1, one value or one per prompt")
    max_len = max_len or decode.cache_length(prompts, max(budgets))
    decode.check_length(prompts, max(budgets), max_len)
    graphdef, state = nnx.split(model)
    es = init_state(cfg, slots, max_len, cache_dtype)
    out = decode.Generation([[] for _ in range(n)], [[] for _ in range(n)])
    queue, slot_rid = collections.deque(range(n)), [None] * slots
    prefill_s, prefill_cpu, start, cpu_start = 0.0, 0.0, time.perf_counter(), time.process_time()
    while True:
        for b in range(slots):
            while slot_rid[b] is None and queue:
                i = queue.popleft()
                t0, c0 = time.perf_counter(), time.process_time()
                tokens_1xT, lengths = decode.padded_prompts([prompts[i]], 1)
                cache_1 = model_lib.init_cache(cfg, 1, max_len, cache_dtype)
                rid = np.array([i], np.int32)
                tok, _, cache_1 = decode.prefill(graphdef, state, tokens_1xT, lengths, rid, cache_1,
                                                 sampling=sampling, seed=seed)  # fmt: skip
                first = int(tok[0])
                prefill_s += time.perf_counter() - t0
                prefill_cpu += time.process_time() - c0
                out.tokens[i], out.loops[i] = [first], [cfg.n_loops]
                if budgets[i] > 1 and first != eos_id:
                    es = admit(es, b, cache_1, first, len(prompts[i]), i, budgets[i] - 1, n_loops=cfg.n_loops)
                    slot_rid[b] = i
        busy = [b for b in range(slots) if slot_rid[b] is not None]
        if not busy:
            break
        es, emit, tok, loops = steps(graphdef, state, es, rule=rule, sampling=sampling, seed=seed, eos_id=eos_id,
                                     n_steps=n_steps)  # fmt: skip
        emit, tok, loops, active = np.asarray(emit), np.asarray(tok), np.asarray(loops), np.asarray(es["active"])
        out.steps += n_steps
        out.busy_slot_steps += n_steps * len(busy)
        for s, b in zip(*np.nonzero(emit)):
            out.tokens[slot_rid[b]].append(int(tok[s, b]))
            out.loops[slot_rid[b]].append(int(loops[s, b]))
        for b in busy:
            if not active[b]:
                slot_rid[b] = None
    out.prefill_seconds = prefill_s
    out.decode_seconds = time.perf_counter() - start - prefill_s
    out.decode_cpu_seconds = time.process_time() - cpu_start - prefill_cpu
    return out
