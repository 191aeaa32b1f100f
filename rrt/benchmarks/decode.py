"""Decoding throughput: static vs continuous depth-wise batching, with and without early exit (wall clock).

    python -m rrt.convert --source <SmolLM2 .gguf> --out runs/smollm2_6x5_r64 --loops 5 --rank 64
    python -m rrt.benchmarks.decode --source runs/smollm2_6x5_r64 --thresholds 0.9,0.5,0.2 --agreement --cosine 0.9

For every exit rule it measures, on the same prompts (the first `--prompt_tokens` tokens of TinyStories paragraphs,
EOS ignored so every request generates exactly `--max_new_tokens`):
  (a) static batching at full depth (`decode.generate`, no exit)
  (b) static batching with early exit: a batch step runs loops until all its tokens have exited
  (c) continuous depth-wise batching with early exit (`depthwise.generate`, `--batch` slots)
tokens/s counts decoded tokens (the first token of each request comes from the full-depth prefill and is not
counted; prefill time is excluded). Every configuration runs once with 2 new tokens to compile (the same shapes),
then (a), (b), (c) run interleaved `--repeats` times and each one's fastest run is kept. Also printed: the mean
exit depth d in loops; the agreement of (b) and (c) with full depth (`agree`: the fraction of generated tokens
that the full-depth model picks too given the same prefix, i.e. teacher-forced on the early-exit output, since one
differing token makes the rest of a sequence diverge; `same`: the fraction of requests whose whole output equals
(a)'s); whether (b) and (c) give the same tokens (they must); and the speedup c/a of (c) over (a) against the
ideal R / d (`frac` = achieved / ideal), by wall clock and by this process's CPU time (on a machine shared with
other jobs the CPU time, summed over XLA's threads, is the steadier measure of the work done). The ideal ignores
what early exit adds: the LM head (final norm and the [D, V] matmul, 28M multiply-adds for SmolLM2, as much as 8
of its layers) after every loop with the logit rules (max_prob, agreement; `cosine` runs it once per token, for the
exiting slots only), the per-slot LoRA gathers and the deep-KV fill. The two `ceiling` columns are what the
multiply-adds allow (`cost_ceiling`): with the head counted, and with all of (c)'s extra work (each slot's grouped
LoRA over the R loops, the deep-KV fill).
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrt import formats
from rrt import model as model_lib
from rrt.decode import cache as decode
from rrt.decode import depthwise, early_exit
from rrt.formats import gguf
from rrt.formats import tokenizer as tokenizer_lib

CORPUS = "../shared/data/corpora/tinystories_val.txt"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rrt.benchmarks.decode", description=__doc__.splitlines()[0])
    p.add_argument("--source", default=None, help="recursive rrt dir (or any source); default: SmolLM2 GGUF")
    p.add_argument("--corpus", default=CORPUS, help="text file; paragraphs (blank-line separated) give prompts")
    p.add_argument("--prompts", type=int, default=16, help="number of requests")
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="static batch size = depth-wise slots")
    p.add_argument("--thresholds", default="0.9", help="comma-separated max_prob thresholds")
    p.add_argument("--agreement", action="store_true", help="also the agreement rule (argmax equals last loop's)")
    p.add_argument("--cosine", default="", help="comma-separated cosine thresholds (the head-free rule)")
    p.add_argument("--n_steps", type=int, default=4, help="engine steps per device call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default=None, help="cast parameters (float32, bfloat16)")
    return p.parse_args(argv)


def load_prompts(path: str, tok, n: int, length: int) -> list[list[int]]:
    """The first `length` tokens of the first `n` paragraphs that have at least that many."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: corpus not found (run from the project root or pass --corpus)")
    with open(path, encoding="utf-8") as f:
        paragraphs = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    out = []
    for ids in tok.encode_batch(paragraphs):
        if len(ids) >= length:
            out.append(ids[:length])
            if len(out) == n:
                return out
    raise ValueError(f"{path}: only {len(out)} paragraphs have {length} tokens; need {n}")


def fastest(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Compiles each run with 2 new tokens (the same shapes), then runs them interleaved `repeats` times (so load
    from other processes hits them alike). Returns each one's fastest run (wall clock) and its least CPU time."""
    for run in runs.values():
        run(2)
    best, cpu = {}, {}
    for _ in range(repeats):
        for name, run in runs.items():
            out = run(None)
            if name not in best or out.decode_seconds < best[name].decode_seconds:
                best[name] = out
            cpu[name] = min(cpu.get(name, float("inf")), out.decode_cpu_seconds)
    return best, cpu


def decoded(out: decode.Generation) -> int:
    return sum(len(t) - 1 for t in out.tokens)


def full_depth_argmax(model: model_lib.Decoder, prompts, outputs) -> list[np.ndarray]:
    """For each request, the full-depth model's greedy token after every prefix of its own output."""
    graphdef, state = nnx.split(model)
    seqs = [p + t[:-1] for p, t in zip(prompts, outputs)]
    tokens_BxT, _ = decode.padded_prompts(seqs, len(seqs))
    logits = jax.jit(lambda s, t: jnp.argmax(nnx.merge(graphdef, s)(t), -1))(state, tokens_BxT)
    return [np.asarray(logits[i, len(p) - 1 : len(p) - 1 + len(t)]) for i, (p, t) in enumerate(zip(prompts, outputs))]


def agreement(model, prompts, out: decode.Generation, ref: decode.Generation) -> tuple[float, float]:
    """(fraction of generated tokens that the full-depth model would also pick given the same prefix, fraction
    of requests whose output equals the full-depth decoding's). Greedy only."""
    want = full_depth_argmax(model, prompts, out.tokens)
    same = np.concatenate([np.asarray(t) == w for t, w in zip(out.tokens, want)])
    return float(same.mean()), float(np.mean([a == b for a, b in zip(out.tokens, ref.tokens)]))


def cost_ceiling(cfg: model_lib.ModelConfig, depth: float, head_every_loop: bool = True) -> tuple[float, float]:
    """Attainable speedup of (c) over (a) by multiply-adds, (head only, all work): (a) runs per token L positions
    (layer + its LoRA) and one head; (c) runs per engine step K positions, and a token takes `depth` steps. A rule
    that reads logits runs the head for every slot at every step (`head_every_loop`); `cosine` runs it once per
    token, for the exiting slots only. "Head only" counts layers and heads; "all work" adds what (c) does beyond
    that: each slot applies the LoRA of all R loops at a position (grouped, `lora.delta`) and the deep-KV fill
    projects k and v at all L positions (whenever any slot needs a fill, nearly every step). Attention over the
    cache is left out."""
    dims = cfg.projections()
    layer = sum(i * o for i, o in dims.values())
    lora = sum(cfg.rank(n) * (i + o) for n, (i, o) in dims.items()) if cfg.relaxed else 0
    kv = sum(i * o + (cfg.rank(n) * (i + o) if cfg.relaxed else 0) for n, (i, o) in dims.items() if n in ("k", "v"))
    head = cfg.d_model * cfg.vocab_size
    full = cfg.n_layers * (layer + lora) + head
    step_head = head if head_every_loop else head / depth  # per token: a head per loop, or one
    head_only = (cfg.n_layers * layer + head) / (depth * (cfg.n_shared * layer + step_head))
    groups = cfg.n_loops if cfg.strategy == "cycle" else 1
    step = cfg.n_shared * (layer + groups * lora) + step_head + cfg.n_layers * kv
    return head_only, full / (depth * step)


def main(argv=None) -> int:
    args = parse_args(argv)
    source = args.source or gguf.smollm2_gguf_path()
    cfg, params = formats.load(source, dtype=args.dtype)
    model = model_lib.from_params(cfg, params)
    tok = tokenizer_lib.load_tokenizer(source)
    prompts = load_prompts(args.corpus, tok, args.prompts, args.prompt_tokens)
    max_len = decode.cache_length(prompts, args.max_new_tokens)
    r = cfg.n_loops
    print(f"model {source}: {cfg.n_shared} shared layers x {r} loops ({cfg.strategy}), LoRA rank "
          f"{cfg.rank_attn}/{cfg.rank_mlp}; {len(prompts)} requests of {args.prompt_tokens} tokens, "
          f"{args.max_new_tokens} new tokens each, batch/slots {args.batch}, cache {max_len}")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    def static(rule):
        return lambda n: decode.generate(model, prompts, n or args.max_new_tokens, rule=rule,
                                         batch_size=args.batch, max_len=max_len)  # fmt: skip

    def engine(rule):
        return lambda n: depthwise.generate(model, prompts, n or args.max_new_tokens, slots=args.batch, rule=rule,
                                            max_len=max_len, n_steps=args.n_steps)  # fmt: skip

    t0 = time.perf_counter()
    rules = [early_exit.ExitRule("max_prob", float(t)) for t in args.thresholds.split(",") if t]
    rules += [early_exit.ExitRule("agreement")] if args.agreement else []
    rules += [early_exit.ExitRule("cosine", float(t)) for t in args.cosine.split(",") if t]
    print("tokens/s by wall clock; c/a and frac by wall clock, then by CPU time")
    print(
        f"{'rule':>16} | {'(a)':>7} | {'(b)':>7} {'agree':>5} {'same':>4} | {'(c)':>7} {'agree':>5} {'same':>4} "
        f"{'b==c':>4} | {'d':>5} {'R/d':>5} | {'c/a':>5} {'frac':>5} | {'c/a':>5} {'frac':>5} | ceiling: head  all"
    )
    for rule in rules:
        out, cpu = fastest({"a": static(None), "b": static(rule), "c": engine(rule)}, args.repeats)
        full, b, c = out["a"], out["b"], out["c"]
        depth = float(np.mean(np.concatenate([x[1:] for x in c.loops])))
        a_tps, b_tps, c_tps = (decoded(x) / x.decode_seconds for x in (full, b, c))
        (b_agree, b_same), (c_agree, c_same) = agreement(model, prompts, b, full), agreement(model, prompts, c, full)
        name = "agreement" if rule.kind == "agreement" else f"{rule.kind}>={rule.threshold:g}"
        ideal, speedup, cpu_speedup = r / depth, c_tps / a_tps, cpu["a"] / cpu["c"]
        print(f"{name:>16} | {a_tps:7.1f} | {b_tps:7.1f} {b_agree:5.2f} {b_same:4.2f} | {c_tps:7.1f} {c_agree:5.2f} "
              f"{c_same:4.2f} {str(b.tokens == c.tokens):>4} | {depth:5.2f} {ideal:5.2f} | {speedup:5.2f} "
              f"{speedup / ideal:5.2f} | {cpu_speedup:5.2f} {cpu_speedup / ideal:5.2f} | "
              "{:>11.2f} {:>4.2f}".format(*cost_ceiling(cfg, depth, rule.needs_logits)), flush=True)  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f}; total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
