"""Attention alone on this CPU: `python -m rrt.benchmarks.attention [--batch 4 --seq 256,1024 --blocks 64,128,256]`.

For one layer of the SmolLM2-135M shape (9 query heads, 3 KV heads of 64, float32) on rows packing two documents,
forward and forward + backward (gradients wrt q, k, v of a non-trivial scalar), in milliseconds:
  xla:<block>  rrt's XLA path, `rrt.attention.blockwise` with query blocks of that many rows (XLA_BLOCK is the
               default the model uses)
  dense        the single [B, G, N/G, T, T] einsum rrt used before (`attend` with the full causal mask; decoding
               with a KV cache still calls it)
  torch        torch's fused `scaled_dot_product_attention` (is_causal, enable_gqa), what transformers' Llama runs
All variants are taken in turns (ABAB...) in one process, `--repeats` rounds after a warm-up, and the best of the
rounds is printed with the other processes' share of the cores (rrt.benchmarks.train.CoreWatch). Errors against
the dense path are printed too, so a fast wrong variant shows.
"""

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rrt import attention
from rrt.benchmarks.train import SMOLLM2, CoreWatch


def rows(b: int, t: int, seed: int = 0):
    """q, k, v and two packed documents per row (positions restart at the second one)."""
    c = SMOLLM2
    r = np.random.default_rng(seed)
    q = r.standard_normal((b, t, c.n_heads, c.head_dim), np.float32)
    k, v = (r.standard_normal((b, t, c.n_kv_heads, c.head_dim), np.float32) for _ in range(2))
    cut = t // 3
    seg = np.where(np.arange(t) < cut, 1, 2).astype(np.int32)[None].repeat(b, 0)
    pos = np.where(np.arange(t) < cut, np.arange(t), np.arange(t) - cut).astype(np.int32)[None].repeat(b, 0)
    return q, k, v, pos, seg


def jax_variants(pos, seg, blocks) -> dict:
    out = {
        f"xla:{bq}": functools.partial(attention.blockwise, positions_BxT=pos, segment_ids_BxT=seg, block=bq)
        for bq in blocks
    }
    mask = attention.causal_mask(jnp.asarray(pos), jnp.asarray(seg))
    out["dense"] = lambda q, k, v: attention.attend(q, k, v, mask)
    return out


def timed(variants: dict, repeats: int) -> dict:
    """{name: (best forward s, best forward+backward s, others' core share)}, taken in turns."""
    best = {n: [float("inf"), float("inf"), 0.0] for n in variants}
    for i in range(repeats + 1):
        for name, (fwd, both) in variants.items():
            with CoreWatch() as watch:
                t0 = time.perf_counter()
                fwd()
                t1 = time.perf_counter()
                both()
                t2 = time.perf_counter()
            if i:
                b = best[name]
                b[0], b[1], b[2] = min(b[0], t1 - t0), min(b[1], t2 - t1), max(b[2], watch.others_share)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", default="256,1024", help="comma-separated row lengths")
    ap.add_argument("--blocks", default="64,128,256", help="comma-separated query block sizes of the XLA path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no_torch", action="store_true")
    args = ap.parse_args()
    blocks = [int(x) for x in args.blocks.split(",")]
    print(
        f"attention, one layer: {SMOLLM2.n_heads} heads / {SMOLLM2.n_kv_heads} KV of {SMOLLM2.head_dim}, float32, "
        f"batch {args.batch}; load average {os.getloadavg()[0]:.2f}"
    )
    for t in (int(x) for x in args.seq.split(",")):
        q, k, v, pos, seg = rows(args.batch, t)
        w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
        variants, values = {}, {}
        for name, f in jax_variants(pos, seg, blocks).items():
            fwd = jax.jit(f)
            both = jax.jit(jax.value_and_grad(lambda q, k, v, f=f, w=w: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))
            values[name] = jax.block_until_ready((fwd(q, k, v), both(q, k, v)[1]))
            args_ = (q, k, v)
            variants[name] = (
                lambda fwd=fwd, a=args_: jax.block_until_ready(fwd(*a)),
                lambda both=both, a=args_: jax.block_until_ready(both(*a)),
            )
        if not args.no_torch:
            variants["torch"] = torch_variant(q, k, v, seg, w)
        best = timed(variants, args.repeats)
        ref = jax.tree.leaves(values["dense"])
        print(f"\nT = {t}" + " " * 12 + "forward ms   fwd+bwd ms   vs dense   vs torch   max rel err   others' share")
        for name, (f, fb, others) in best.items():
            err = ""
            if name in values:
                pairs = zip(jax.tree.leaves(values[name]), ref)
                err = f"{max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in pairs):.1e}"
            vs_torch = f"{best['torch'][1] / fb:8.2f}x" if "torch" in best else ""
            print(
                f"  {name:14s} {f * 1e3:10.1f} {fb * 1e3:12.1f} {best['dense'][1] / fb:9.2f}x {vs_torch:>10s}"
                f"   {err:>11s}   {others:6.1%}"
            )
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


def torch_variant(q, k, v, seg, w):
    """torch SDPA, causal, GQA. Its mask is causal over the whole row (it has no segment ids; the boolean mask
    form would leave the fused kernel), so it computes slightly more than the packed variants need, not less."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tq, tk, tv = (torch.tensor(a).transpose(1, 2).contiguous().requires_grad_() for a in (q, k, v))
    tw = torch.tensor(np.asarray(w)).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with torch.no_grad():
            sdpa(tq, tk, tv, is_causal=True, enable_gqa=True)

    def both():
        (sdpa(tq, tk, tv, is_causal=True, enable_gqa=True) * tw).sum().backward()

    return fwd, both


if __name__ == "__main__":
    from rrt import hostmem

    hostmem.reexec_with_hugepages()  # what rrt.train does: rrt/hostmem.py
    main()
