"""Where the training step's time goes, on this CPU: `python -m rrt.benchmarks.profile [--batch 4 --seq 256]`.

Profiles, at the training benchmark's SmolLM2-135M shape (rrt.benchmarks.train), the real step
(`rrt.train.train_step`, float32, one device) of the vanilla 30-layer model and of the strict 15 x 2 recursive one,
and the same step in Hugging Face transformers, and prints the time of each part per step:

  rrt     `jax.profiler` traces --steps steps after a warm-up. Every XLA thunk the CPU runtime executes is an event
          named after its HLO instruction; the compiled module's metadata gives each instruction its op_name, which
          carries the `jax.named_scope` of the model code that emitted it (rrt/model.py, rrt/losses.py, rrt/train.py:
          embed, norm, qkv (projections, RoPE, qk-norm), attention (scores, mask, softmax, values), out_proj, mlp,
          head_loss, optimizer), forward and backward alike (the backward's op_name is `transpose(jvp(...))` around
          the same scope). Instructions outside any scope are split by what they are: the scan's weight indexing
          and gradient accumulation (dynamic-slice / dynamic-update-slice), copies, the rest.
  torch   `torch.profiler` over the same number of steps; self CPU time of each aten op, grouped by kind (matmuls
          by the module that issued them in the forward; backward matmuls together), so the two columns compare
          kinds of work rather than identical partitions.

Parts are summed over the step's threads' wall time of each op (XLA runs one thunk at a time per step here, torch one
op at a time): the column total is close to the step time; "unaccounted" is the step time minus the traced ops
(dispatch, waiting, Python). First, the MLP's three dots alone at the step's shape, XLA against torch (GFLOP/s,
taken in turns). Output: a table per variant and, with --json, the numbers.
"""

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from rrt.benchmarks import train as bench

SCOPES = ("embed", "norm", "qkv", "attention", "out_proj", "mlp", "head_loss", "optimizer")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", re.M)


def part_of(op_name: str, instr: str) -> str:
    """The part an HLO instruction belongs to: the innermost rrt scope in its op_name, else what it is."""
    for component in reversed(op_name.split("/")):  # a scope may sit inside a transform: jvp(mlp), transpose(...)
        for word in reversed(re.findall(r"\w+", component)):
            if word in SCOPES:
                return word
    if "dynamic_update_slice" in op_name or "dynamic-update-slice" in instr:
        return "scan: accumulate / write"
    if "dynamic_slice" in op_name or "dynamic-slice" in instr:
        return "scan: index weights"
    if instr.startswith("copy") or "copy" in instr.split(".")[0]:
        return "copies"
    return "other"


def instruction_parts(hlo_text: str) -> dict[str, str]:
    return {name: part_of(op, name) for name, op in _INSTR.findall(hlo_text)}


def trace_durations(trace_dir: str) -> dict[str, float]:
    """Total duration (s) of every complete event of the newest perfetto trace under `trace_dir`, by name."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    out = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith("end: "):
            out[e["name"]] += e.get("dur", 0.0) * 1e-6
    return out


def profile_rrt(cfg, b: int, t: int, steps: int) -> dict:
    """{part: seconds per step}, plus the median step time, of the real step of `cfg`."""
    params = bench.init_params(cfg)
    fn, opt = bench.step_fn(cfg, params)
    opt_state = opt.init(params)
    batch = jax.tree.map(jnp.asarray, bench.make_batch(b, t, cfg.vocab_size))
    log = jnp.asarray(False)
    compiled = fn.lower(params, opt_state, None, batch, log).compile()
    parts = instruction_parts(compiled.as_text())
    params, opt_state, _ = compiled(params, opt_state, None, batch, log)  # warm-up
    jax.block_until_ready(params)
    trace_dir = tempfile.mkdtemp(prefix="rrt_profile_")
    times = []
    try:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(steps):
            start = time.perf_counter()
            params, opt_state, metrics = compiled(params, opt_state, None, batch, log)
            jax.block_until_ready((params, opt_state, metrics))
            times.append(time.perf_counter() - start)
        jax.profiler.stop_trace()
        durations = trace_durations(trace_dir)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    by_part = collections.defaultdict(float)
    for name, seconds in durations.items():
        if name in parts:
            by_part[parts[name]] += seconds / steps
    return {"parts": dict(by_part), "step_s": float(np.median(times))}


TORCH_KINDS = (  # (kind, aten op name patterns), first match wins
    ("head_loss", ("log_softmax", "nll_loss", "cross_entropy")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax", "baddbmm", "bmm")),
    ("embed", ("embedding",)),
    ("optimizer", ("_foreach", "adam", "norm", "clamp", "lerp", "addcdiv", "addcmul", "sqrt_", "_fused")),
    ("matmul", ("mm", "addmm", "linear", "matmul")),
    ("norm", ("rsqrt", "pow", "mean")),
    ("mlp", ("silu",)),
)


def torch_kind(name: str) -> str:
    op = name.removeprefix("aten::")
    for kind, pats in TORCH_KINDS:
        if any(p == op or p in op for p in pats):
            return kind
    return "other (elementwise, copies)"


def profile_torch(b: int, t: int, steps: int) -> dict:
    """{kind: seconds per step} of the transformers step (self CPU time per aten op), and the median step time."""
    from torch.profiler import ProfilerActivity, profile

    step, _ = bench.torch_stepper(b, t)  # the benchmark's own transformers step

    step()  # warm-up
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    by_kind = collections.defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            by_kind[torch_kind(e.key)] += e.self_cpu_time_total * 1e-6 / steps
    return {"parts": dict(by_kind), "step_s": float(np.median(times))}


def matmul_rates(b: int, t: int, repeats: int = 7) -> dict:
    """GFLOP/s of the MLP's three dots at the step's shape ([B T, D] x [D, F] forward, the input gradient, the weight
    gradient), in XLA (jit) and in torch, taken in turns in this process: the kernels themselves, without the step."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    m, d, f = b * t, bench.SMOLLM2.d_model, bench.SMOLLM2.d_ff
    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(s).astype(np.float32) for s in ((m, d), (d, f), (m, f)))
    jx, jw, jg = (jnp.asarray(a) for a in (x, w, g))
    tx, tw, tg = (torch.from_numpy(a.copy()) for a in (x, w, g))
    cases = {
        "forward x W": (jax.jit(lambda x, w: x @ w), (jx, jw), lambda: tx @ tw),
        "input grad g W^T": (jax.jit(lambda g, w: g @ w.T), (jg, jw), lambda: tg @ tw.T),
        "weight grad x^T g": (jax.jit(lambda x, g: x.T @ g), (jx, jg), lambda: tx.T @ tg),
    }
    out = {}
    for name, (jfn, args, tfn) in cases.items():
        jax.block_until_ready(jfn(*args))
        tfn()
        times = {"xla": [], "torch": []}
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(jfn(*args))
            times["xla"].append(time.perf_counter() - start)
            start = time.perf_counter()
            tfn()
            times["torch"].append(time.perf_counter() - start)
        out[name] = {k: 2 * m * d * f / float(np.median(v)) / 1e9 for k, v in times.items()}
    return out


def table(title: str, res: dict) -> str:
    rows = sorted(res["parts"].items(), key=lambda kv: -kv[1])
    traced = sum(v for _, v in rows)
    lines = [f"{title}: step {res['step_s']:.2f} s (median)", f"  {'part':28s} {'s/step':>8s} {'share':>7s}"]
    for k, v in rows:
        lines.append(f"  {k:28s} {v:8.3f} {v / res['step_s']:7.1%}")
    lines.append(f"  {'unaccounted':28s} {res['step_s'] - traced:8.3f} {(res['step_s'] - traced) / res['step_s']:7.1%}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="profiled steps (after one warm-up step)")
    p.add_argument("--variants", default="vanilla,recursive,torch", help="any of vanilla, recursive, torch")
    p.add_argument("--json", default=None, help="also write the numbers here")
    a = p.parse_args()
    print(
        f"load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores; jax {jax.__version__}; "
        f"SmolLM2-135M shape, batch {a.batch} x {a.seq}, float32",
        flush=True,
    )
    out = {}
    rates = out["matmuls"] = matmul_rates(a.batch, a.seq)
    for name, r in rates.items():
        print(f"MLP dot {name:18s} ({a.batch * a.seq} rows): XLA {r['xla']:6.1f} GFLOP/s, torch {r['torch']:6.1f}")
    for name in a.variants.split(","):
        before = os.getloadavg()[0]
        if name == "torch":
            res = profile_torch(a.batch, a.seq, a.steps)
            title = "transformers (torch) step"
        else:
            cfg = dataclasses.replace(bench.variant(name))
            res = profile_rrt(cfg, a.batch, a.seq, a.steps)
            title = f"rrt {name} step" + (" (15 x 2)" if name == "recursive" else " (30 layers)")
        res["load_before"], res["load_after"] = before, os.getloadavg()[0]
        out[name] = res
        print(table(title, res) + f"\n  load average {before:.1f} -> {res['load_after']:.1f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"batch": a.batch, "seq": a.seq, **out}, f, indent=2)


if __name__ == "__main__":
    from rrt import hostmem

    hostmem.reexec_with_hugepages()  # what rrt.train does: rrt/hostmem.py
    main()
