"""Training-step benchmark on this CPU: `python -m rrt.benchmarks.train` (about 50 minutes on 2 loaded cores).

One run prints, for the SmolLM2-135M shape (V 49152, D 576, L 30, 9 heads / 3 KV heads of 64, F 1536, tied, rope
theta 1e5) at batch 4 x 256 tokens in float32 (--dtype bfloat16: rrt's `--config.dtype=bfloat16`, float32
parameters, against transformers under torch.autocast), the real step (`rrt.train.train_step`: loss over every
loop's exit, gradients, global-norm clipping, AdamW):
  throughput  tokens/s and MFU of the vanilla 30-layer step; MFU against the float32 matmul peak measured in the
              same run (`rrt.flops.measure_matmul_peak`), FLOPs from `rrt.flops` (matmuls only, remat not counted)
  torch       the same step in Hugging Face transformers (LlamaForCausalLM, AdamW, clipping, float32, all cores),
              taken in turns with rrt's steps (ABAB), so that a change of load hits both. It runs in a process of
              its own, driven step by step through a pipe: in one process the two libraries' allocators disturb
              each other (an XLA step right after a torch step took 2-3 s longer, its heap handed back to the
              system). The torch process runs without rrt's malloc tunable (rrt/hostmem.py), as transformers
              users run it, unless --torch_hugepages (it does not make the torch step faster here)
  recursion   the strict 15 x 2 recursive step over the vanilla step (the same FLOPs), steps taken in turns in
              one process; also a logged recursive step, which computes loop 1's loss for the log (+1 head forward)
  compile     compile time of 15 x 8 over 15 x 2 (K = 15 shared layers, B = 8 vs 2 loops): the scans keep it flat
  memory      peak RSS of a fresh process running one step, and XLA's own account of the step (arguments + temps),
              for vanilla, strict 15 x 2 and relaxed rank-64 15 x 2, remat none and full; parameter and AdamW-state
              bytes of each
  gemma       on a GPU or TPU (or with --parts gemma): a Recursive-Gemma-1B-shaped step (Gemma-2B's 18 layers as
              9 x 2, CYCLE; bfloat16 compute, float32 master weights, remat dots) at --gemma_batch x --gemma_seq,
              tokens/s and MFU against the device's spec-sheet bfloat16 peak (`rrt.flops.PEAK_BF16`)
Every measurement runs in its own process (a fresh heap: peak RSS is its own, and one variant's allocations never
slow or kill another's). Targets (printed beside each number): MFU >= 50% of the measured peak, >= 1.3x PyTorch,
recursive / vanilla <= 1.05, compile ratio <= 1.2, recursive memory <= vanilla. Timings are medians over --steps
steps after one warm-up step; other load on the machine moves them: the script prints the load average before and
after each measurement, the share of the cores other processes took during it and the hypervisor's steal time
(from /proc/stat), and warns above 10%.
"""

import argparse
import ctypes
import dataclasses
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rrt import flops as flops_lib
from rrt import hostmem, optim, train
from rrt import model as model_lib

SMOLLM2 = model_lib.ModelConfig(
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    d_ff=1536,
    rope_theta=100000.0,
    tie_embeddings=True,
)
VARIANTS = {
    "vanilla": {},
    "recursive": {"n_loops": 2},
    "relaxed64": {"n_loops": 2, "rank_attn": 64, "rank_mlp": 64, "per_position_norms": True},
}


def variant(name: str, remat: str = "none", **changes) -> model_lib.ModelConfig:
    return dataclasses.replace(SMOLLM2, **{**VARIANTS[name], "remat": remat, **changes})


def make_batch(b: int, t: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, vocab, (b, t + 1)).astype(np.int32)
    ones = np.ones((b, t), np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": ones,
        "positions": np.cumsum(ones, axis=1, dtype=np.int32) - 1,
        "loss_mask": ones.astype(np.float32),
    }


def step_fn(cfg: model_lib.ModelConfig, params):
    """(jitted train step, optimizer) exactly as rrt.train builds it on one device."""
    graphdef = nnx.split(model_lib.abstract(cfg))[0]
    opt, _ = optim.make(optim.OptimConfig(total_steps=1000, warmup_steps=10), params)
    loss_cfg = train.LossConfig(remat_head=cfg.remat != "none")  # log_all_loops=True, as rrt/config.py
    fn = functools.partial(
        train.train_step,
        opt=opt,
        n_micro=1,
        n_loops=cfg.n_loops,
        graphdef=graphdef,
        teacher_graphdef=None,
        loss_cfg=loss_cfg,
        constrain=None,
    )
    return jax.jit(fn, donate_argnums=(0, 1)), opt


def init_params(cfg: model_lib.ModelConfig) -> dict:
    return nnx.to_pure_dict(nnx.split(model_lib.Decoder(cfg, rngs=nnx.Rngs(0)))[1])


def abstract_params(cfg: model_lib.ModelConfig) -> dict:
    return nnx.to_pure_dict(nnx.split(model_lib.abstract(cfg))[1])


def state_bytes(cfg: model_lib.ModelConfig) -> tuple[int, int]:
    """(parameter bytes, optimizer-state bytes), from shapes only."""
    params = abstract_params(cfg)
    opt, _ = optim.make(optim.OptimConfig(total_steps=1000, warmup_steps=10), params)
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
    return nbytes(params), nbytes(jax.eval_shape(opt.init, params))


def run_jax(cfg, b: int, t: int, steps: int) -> dict:
    """Compile and run the real step `steps` + 1 times (the first is the warm-up): compile time, step times, peak
    RSS after compiling and after the steps, and XLA's own account of the step (arguments + temps + outputs).
    The steps are logged ones (every loop's loss computed): the most memory a step can take."""
    params = init_params(cfg)
    fn, opt = step_fn(cfg, params)
    opt_state = opt.init(params)
    batch = jax.tree.map(jnp.asarray, make_batch(b, t, cfg.vocab_size))
    log = jnp.asarray(True)
    start = time.perf_counter()
    compiled = fn.lower(params, opt_state, None, batch, log).compile()
    compile_s = time.perf_counter() - start
    rss_compiled = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        params, opt_state, metrics = compiled(params, opt_state, None, batch, log)
        jax.block_until_ready((params, opt_state, metrics))
        if i:
            times.append(time.perf_counter() - start)
    assert np.isfinite(float(metrics["loss"])), metrics
    mem = compiled.memory_analysis()
    xla = None
    if mem is not None:
        xla = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    rss_step = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "compile_s": compile_s,
        "step_s": times,
        "rss_compiled": rss_compiled,
        "rss_step": rss_step,
        "xla_step": xla,
    }


class CoreWatch:
    """What else used the cores during a measurement: the load average before and after, the CPU seconds every
    other process took (/proc/stat's busy time minus this process's own and that of `pids`, the measurement's own
    workers) and the steal time (the hypervisor giving the cores to another machine), each as a share of the cores'
    wall time."""

    def __init__(self, pids: tuple[int, ...] = ()):
        self.pids = pids

    def __enter__(self):
        self.load_before, self.wall, self.own = os.getloadavg()[0], time.time(), _own_s(self.pids)
        self.busy, self.steal = _busy_steal_s()
        return self

    def __exit__(self, *exc):
        cores_s = max((time.time() - self.wall) * len(os.sched_getaffinity(0)), 1e-9)
        busy, steal = _busy_steal_s()
        self.load_after = os.getloadavg()[0]
        self.others_share = max(0.0, (busy - self.busy) - (_own_s(self.pids) - self.own)) / cores_s
        self.steal_share = (steal - self.steal) / cores_s

    def record(self) -> dict:
        return {k: getattr(self, k) for k in ("load_before", "load_after", "others_share", "steal_share")}


def _busy_steal_s() -> tuple[float, float]:
    """(busy CPU seconds of this machine's processes, steal seconds) so far (Linux /proc/stat; zeros elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]] + [0] * 8
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _, _, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _own_s(pids: tuple[int, ...] = ()) -> float:
    """CPU seconds of this process and of `pids` (from /proc/<pid>/stat; a process that is gone counts 0)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


class TorchWorker:
    """The transformers step (`torch_stepper`) in a process of its own, one step per request through a pipe;
    `step()` returns the step's time as the worker measured it."""

    def __init__(self, b: int, t: int, hugepages: bool = False, dtype: str = "float32"):
        env = dict(os.environ) if hugepages else {**hostmem.without_tunable(dict(os.environ)), "RRT_HUGEPAGES": "0"}
        cmd = [sys.executable, "-m", "rrt.benchmarks.train", "--probe=torch_worker", f"--batch={b}", f"--seq={t}",
               f"--dtype={dtype}"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.threads = self._reply()["threads"]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker exited with {self.proc.wait()} (its stderr is above)")
        return json.loads(line)

    def step(self) -> float:
        return self._ask("step")["step_s"]

    def trim(self) -> None:
        self._ask("trim")

    def _ask(self, request: str) -> dict:
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def trim_heap() -> None:
    """Hand the heap's free memory back to the system (glibc's malloc_trim; nothing elsewhere). Called at the end
    of each turn, so that the rrt and the torch process need not hold their peaks at once (at 4 x 1,024 the two
    together exceed this machine's 24 GiB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def torch_worker(b: int, t: int, dtype: str = "float32") -> None:
    """The worker's side of TorchWorker: build the step, then one timed step per "step" line on stdin, and
    `trim_heap` per "trim" line."""
    step, threads = torch_stepper(b, t, dtype)
    print(json.dumps({"threads": threads}), flush=True)
    for line in sys.stdin:
        if line.strip() == "trim":
            trim_heap()
            print(json.dumps({}), flush=True)
            continue
        if line.strip() != "step":
            raise ValueError(f"torch worker: unknown request {line!r}")
        start = time.perf_counter()
        step()
        print(json.dumps({"step_s": time.perf_counter() - start}), flush=True)


def interleaved(
    b: int, t: int, steps: int, with_torch: bool = True, torch_hugepages: bool = False, dtype: str = "float32"
) -> dict:
    """Step times of vanilla, recursive 15 x 2 and (with_torch) the transformers step, measured in turns
    (v, r, r', torch, v, r, r', torch, ...), so that a change of load moves them alike. Each turn is two steps back
    to back and only the second is timed: on this machine (a VM with a virtio balloon) memory a process frees is
    handed back to the host within seconds, and the first step after another's turn faults it in again (+2 s for
    rrt's vanilla step after a torch step), which a training loop, running its steps back to back, never pays. r is
    a step the training loop does not log (most steps: log_every is 10 by default), r' a logged one, which also
    computes the untrained loop's loss for the log (one more head forward): the same compiled step, called with
    log_loops False / True. Vanilla has one loop: both are equal. Each turn ends with `trim_heap` in the process
    that ran it. Each timed step records the load and the other processes' CPU share (CoreWatch; the torch worker's
    CPU time counts as the measurement's own)."""
    batch = jax.tree.map(jnp.asarray, make_batch(b, t, SMOLLM2.vocab_size))
    runs = {}
    for name, cfg in (("vanilla", variant("vanilla", dtype=dtype)), ("recursive", variant("recursive", dtype=dtype))):
        params = init_params(cfg)
        fn, opt = step_fn(cfg, params)
        state = [params, opt.init(params)]
        start = time.perf_counter()
        compiled = fn.lower(state[0], state[1], None, batch, jnp.asarray(False)).compile()

        def run(r):
            params, opt_state, metrics = r["step"](r["state"][0], r["state"][1], None, batch, r["log"])
            jax.block_until_ready((params, opt_state, metrics))
            r["state"][:] = [params, opt_state]
            assert np.isfinite(float(metrics["loss"])), metrics

        runs[name] = {"state": state, "step": compiled, "compile_s": time.perf_counter() - start, "run": run}
        runs[name]["log"] = jnp.asarray(False)
    runs["recursive_logged"] = {**runs["recursive"], "log": jnp.asarray(True)}  # shares the state
    worker = TorchWorker(b, t, torch_hugepages, dtype) if with_torch else None
    if worker:
        runs["torch"] = {"run": lambda r: worker.step(), "compile_s": 0.0, "threads": worker.threads}
    for r in runs.values():
        r["step_s"], r["watch"] = [], []
    pids = (worker.proc.pid,) if worker else ()
    for i in range(steps + 1):
        for name, r in runs.items():
            r["run"](r)  # each turn's first step is not timed (see above)
            if i:
                with CoreWatch(pids) as watch:
                    start = time.perf_counter()
                    own = r["run"](r)
                    elapsed = own if isinstance(own, float) else time.perf_counter() - start
                r["step_s"].append(elapsed)
                r["watch"].append(watch.record())
            (worker.trim if name == "torch" else trim_heap)()  # the end of a turn
    if worker:
        worker.close()
    keep = ("compile_s", "step_s", "watch", "threads")
    return {name: {k: r[k] for k in keep if k in r} for name, r in runs.items()}


def torch_step_parts(b: int, t: int):
    """(model, AdamW, input ids) of the transformers step: LlamaForCausalLM of the SmolLM2 shape, float32."""
    import torch
    import transformers

    c = SMOLLM2
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        rope_theta=c.rope_theta,
        rms_norm_eps=c.norm_eps,
        tie_word_embeddings=True,
        max_position_embeddings=max(2048, t),
    )
    model = transformers.LlamaForCausalLM(hf_cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = torch.as_tensor(make_batch(b, t, c.vocab_size)["inputs"], dtype=torch.long)
    return model, opt, ids


def torch_stepper(b: int, t: int, dtype: str = "float32"):
    """(step, threads): one call is the transformers step (forward + loss, backward, clip to norm 1, AdamW). With
    dtype bfloat16, the forward and loss run under `torch.autocast("cpu", torch.bfloat16)` (PyTorch's mixed
    precision: float32 parameters, bf16 matmuls; the backward follows the forward's dtypes), as rrt's
    `--config.dtype=bfloat16` keeps float32 parameters and computes in bf16."""
    import contextlib

    import torch

    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model, opt, ids = torch_step_parts(b, t)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"torch step: loss {loss.item()}")

    return step, torch.get_num_threads()


def compile_seconds(cfg: model_lib.ModelConfig, b: int, t: int) -> dict:
    """Trace + lower and XLA compile times of the step (abstract parameters: nothing is allocated)."""
    params = abstract_params(cfg)
    fn, opt = step_fn(cfg, params)
    opt_state = jax.eval_shape(opt.init, params)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in make_batch(b, t, cfg.vocab_size).items()}
    start = time.perf_counter()
    lowered = fn.lower(params, opt_state, None, batch, jax.ShapeDtypeStruct((), jnp.bool_))
    lower_s = time.perf_counter() - start
    lowered.compile()
    return {"lower_s": lower_s, "compile_s": time.perf_counter() - start - lower_s}


def gemma_config(layers: int = 18) -> model_lib.ModelConfig:
    """Recursive Gemma 1B: Gemma-2B's shape (rrt/archs.py) with `layers` layers looped twice, bfloat16."""
    from configs import archs
    from rrt.formats import hf

    base = hf.config_from_hf(dict(archs.GEMMA_2B))
    return dataclasses.replace(base, n_layers=layers, n_loops=2, dtype="bfloat16", remat="dots")


def run_gemma(b: int, t: int, steps: int, layers: int) -> dict:
    """The real step of `gemma_config` on device 0: step times, tokens/s and MFU against the bfloat16 peak."""
    cfg = gemma_config(layers)
    out = run_jax(cfg, b, t, steps)
    peak, src = flops_lib.peak_flops_per_device("bfloat16")
    step = median(out["step_s"])
    tok_s = b * t / step
    out.update(tokens_per_s=tok_s, mfu=tok_s * flops_lib.train_flops_per_token(cfg, t, 1) / peak, peak=peak,
               peak_source=src, device=jax.devices()[0].device_kind)  # fmt: skip
    return out


def probe(what: str, b: int, t: int, steps: int, dtype: str = "float32") -> dict:
    """One measurement, run in this (fresh) process: interleaved[:torch] | compile:<loops> | <variant>:<remat> |
    gemma:<layers> (b, t are then the Gemma batch and sequence length)."""
    if what.startswith("gemma:"):
        return run_gemma(b, t, steps, int(what.split(":")[1]))
    if what.startswith("interleaved"):  # interleaved | interleaved:torch | interleaved:torch_hugepages
        return interleaved(
            b, t, steps, with_torch=":torch" in what, torch_hugepages=what.endswith("_hugepages"), dtype=dtype
        )
    if what.startswith("compile:"):
        loops = int(what.split(":")[1])
        return compile_seconds(variant("recursive", n_layers=15 * loops, n_loops=loops), b, t)
    name, remat = what.split(":")
    return run_jax(variant(name, remat), b, t, steps)


def measure(what: str, b: int, t: int, steps: int, dtype: str = "float32") -> dict:
    """`probe` in a separate process: every measurement starts from an empty heap, and peak RSS is its own."""
    cmd = [
        sys.executable,
        "-m",
        "rrt.benchmarks.train",
        f"--probe={what}",
        f"--batch={b}",
        f"--seq={t}",
        f"--steps={steps}",
        f"--dtype={dtype}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        killed = " (killed: out of memory?)" if out.returncode == -9 else ""
        raise RuntimeError(f"probe {what} exited with {out.returncode}{killed}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(xs) -> float:
    return statistics.median(xs)


def mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: torch,recursion,compile,memory")
    p.add_argument("--parts", default="", help="extra parts: gemma (run by default on a GPU or TPU)")
    p.add_argument("--gemma_batch", type=int, default=8)
    p.add_argument("--gemma_seq", type=int, default=2048)
    p.add_argument("--gemma_layers", type=int, default=18, help="Gemma-2B layers before looping (smaller: smoke)")
    p.add_argument("--torch_hugepages", action="store_true", help="run the torch step under rrt's malloc tunable too")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype of the timed steps: rrt's --config.dtype, torch.autocast for transformers",
    )
    p.add_argument("--probe", default="", help=argparse.SUPPRESS)  # internal: one measurement (see `probe`)
    a = p.parse_args()
    b, t = a.batch, a.seq
    if a.probe == "torch_worker":
        return torch_worker(b, t, a.dtype)
    if a.probe:
        print(json.dumps(probe(a.probe, b, t, a.steps, a.dtype)))
        return
    if "gemma" in a.parts.split(",") or jax.devices()[0].platform != "cpu":
        g = measure(f"gemma:{a.gemma_layers}", a.gemma_batch, a.gemma_seq, a.steps)
        print(
            f"Recursive Gemma 1B shape ({a.gemma_layers} layers as {a.gemma_layers // 2} x 2, bfloat16, remat dots) on "
            f"{g['device']}, batch {a.gemma_batch} x {a.gemma_seq}: step {median(g['step_s']):.3f} s, "
            f"{g['tokens_per_s']:.0f} tokens/s, MFU {g['mfu']:.1%} of {g['peak'] / 1e12:.0f} TFLOP/s "
            f"({g['peak_source']})",
            flush=True,
        )
        if jax.devices()[0].platform != "cpu":
            return  # the CPU-shaped parts below are meant for this CPU
    skip = set(a.skip.split(",")) - {""}
    gib = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
    print(
        f"load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores; jax {jax.__version__} "
        f"({jax.devices()[0].device_kind}); SmolLM2-135M shape, batch {b} x {t}, compute {a.dtype}; one process per "
        "measurement; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}",
        flush=True,
    )
    peak = flops_lib.measure_matmul_peak(dtype=jnp.dtype(a.dtype), seconds=2.0)
    print(f"measured {a.dtype} matmul peak (2048^3): {peak / 1e9:.1f} GFLOP/s", flush=True)

    tokens = b * t
    with_torch = "" if "torch" in skip else ":torch_hugepages" if a.torch_hugepages else ":torch"
    timed = measure("interleaved" + with_torch, b, t, a.steps, a.dtype)
    for name, r in timed.items():  # what else ran during each timed step
        w = r["watch"]
        busy, steal = max(x["others_share"] for x in w), max(x["steal_share"] for x in w)
        print(
            f"  {name}: load average {w[0]['load_before']:.1f} before its first timed step, {w[-1]['load_after']:.1f} "
            f"after its last; during a step other processes used at most {busy:.0%} of the cores, the hypervisor "
            f"took (steal) at most {steal:.0%}"
            + (
                " -- WARNING: something else used the cores; rerun on a quiet machine" if max(busy, steal) > 0.1 else ""
            ),
            flush=True,
        )
    v_step = median(timed["vanilla"]["step_s"])
    v_tok_s = tokens / v_step
    mfu = v_tok_s * flops_lib.train_flops_per_token(variant("vanilla"), t, 1) / peak
    print(
        f"vanilla 30 layers: step {v_step:.2f} s (min {min(timed['vanilla']['step_s']):.2f}), {v_tok_s:.0f} tokens/s, "
        f"MFU {mfu:.1%} of the measured peak [target >= 50%: {mark(mfu >= 0.5)}]; compile "
        f"{timed['vanilla']['compile_s']:.1f} s",
        flush=True,
    )
    if "recursion" not in skip:
        for name, what in (
            ("recursive", "a step the loop does not log (9 in 10 by default)"),
            ("recursive_logged", "a logged step (+ loop 1's loss for the log)"),
        ):
            ratio = median(timed[name]["step_s"]) / v_step
            target = f" [target <= 1.05: {mark(ratio <= 1.05)}]" if name == "recursive" else ""
            print(
                f"recursive 15 x 2, {what}: step {median(timed[name]['step_s']):.2f} s, {ratio:.3f}x vanilla "
                f"(steps taken in turns){target}",
                flush=True,
            )

    if "torch" not in skip:
        pt = timed["torch"]
        ratio = median(pt["step_s"]) / v_step
        print(
            f"torch (transformers, {pt['threads']} threads): step {median(pt['step_s']):.2f} s, taken in turns with "
            f"rrt's; rrt is {ratio:.2f}x faster [target >= 1.3x: {mark(ratio >= 1.3)}]",
            flush=True,
        )

    if "compile" not in skip:
        c2, c8 = measure("compile:2", b, t, 0), measure("compile:8", b, t, 0)
        ratio = (c8["lower_s"] + c8["compile_s"]) / (c2["lower_s"] + c2["compile_s"])
        print(
            f"compile 15 x 2: trace {c2['lower_s']:.1f} s + XLA {c2['compile_s']:.1f} s; 15 x 8: trace "
            f"{c8['lower_s']:.1f} s + XLA {c8['compile_s']:.1f} s; ratio {ratio:.2f} [target <= 1.2: "
            f"{mark(ratio <= 1.2)}]",
            flush=True,
        )

    if "memory" not in skip:
        print(
            f"{'memory':24s} {'params':>10s} {'AdamW':>10s} {'RSS compiled':>13s} {'RSS step':>10s} {'XLA step':>10s}"
        )
        runs = {}
        for name in VARIANTS:
            pb, ob = state_bytes(variant(name))
            for remat in ("none", "full"):
                m = runs[name, remat] = measure(f"{name}:{remat}", b, t, 0)
                xla = gib(m["xla_step"]) if m["xla_step"] is not None else "n/a"
                print(
                    f"{name + ', remat ' + remat:24s} {gib(pb):>10s} {gib(ob):>10s} {gib(m['rss_compiled']):>13s} "
                    f"{gib(m['rss_step']):>10s} {xla:>10s}",
                    flush=True,
                )
        for remat in ("none", "full"):
            for key in ("rss_step", "xla_step"):
                if runs["vanilla", remat][key] is not None:
                    ok = runs["recursive", remat][key] <= runs["vanilla", remat][key]
                    print(f"recursive <= vanilla memory (remat {remat}, {key}): {mark(ok)}")


if __name__ == "__main__":
    from rrt import hostmem

    hostmem.reexec_with_hugepages()  # what rrt.train does: rrt/hostmem.py
    main()
