"""Ahead-of-time compilation of the real train step for a TPU slice, on any machine (no TPU, no weights).

    python -m rrt.aot --config configs/recursive_gemma_1b.py --topology v5e-256 [--config.x=y ...] [--output aot.json]

Needs `libtpu` importable (requirements.txt pins the version jax[tpu] wants). The model, optimizer, mesh and
shardings come from `rrt.train.build_step`, the function training uses, fed abstract arrays
(`jax.ShapeDtypeStruct`s carrying the shardings); the source model's shapes come from the config's `arch` (its
published config.json) or, when `config.source` is a directory with a config.json, from that. Reports per chip the
bytes of parameters, optimizer state, batch, XLA's temporaries and outputs against the chip's HBM; per step XLA's
FLOPs beside rrt/flops.py's, XLA's estimated step time (when its cost model gives one) and the MFU it implies; the
collectives in the compiled HLO by kind with their result bytes (each op counted once, also inside loop bodies);
the Pallas kernel calls (splash attention, `--config.attention`); and the compile time. Exits 1 when the step does
not fit, naming the largest buffers.

Slice names: `v5e-256`, `v6e-64` (chips), `v4-64`, `v5p-128` (TensorCores, 2 per chip), or the raw `v5e:16x16` form.
"""

import collections
import json
import math
import os
import re
import sys
import time

# Compiling only: several processes (tests, parallel runs) may load libtpu at once without a TPU to share.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from rrt import flops as flops_lib  # noqa: E402
from rrt import losses, train  # noqa: E402
from rrt import model as model_lib  # noqa: E402
from rrt import sharding as sharding_lib  # noqa: E402
from rrt.data import packing  # noqa: E402

_CONFIG = train._CONFIG  # --config and its --config.x=y overrides, defined once by rrt.train
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: v5e-256, v5p-128, v4-64, v6e-256 or v5e:16x16")
_OUTPUT = flags.DEFINE_string("output", "", "write the report as JSON here")

GIB = 1024**3
# per chip: HBM bytes, peak bf16 FLOP/s, TensorCores per chip (the count in a slice's name), 3-D torus
CHIPS = {
    "v4": (32 * GIB, 275e12, 2, True),
    "v5e": (16 * GIB, 197e12, 1, False),
    "v5p": (95 * GIB, 459e12, 2, True),
    "v6e": (32 * GIB, 918e12, 1, False),
}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1})


def parse_topology(name: str) -> tuple[str, str]:
    """'v5e-256' / 'v5e:16x16' -> (generation, 'v5e:16x16')."""
    if ":" in name:
        gen = name.split(":")[0]
        if gen not in CHIPS:
            raise ValueError(f"unknown TPU generation {gen!r} in {name!r}; known: {sorted(CHIPS)}")
        return gen, name
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
    if not m:
        raise ValueError(f"topology {name!r}: expected e.g. v5e-256, v5p-128, v4-64, v6e-256 or v5e:16x16")
    gen, n = m.group(1), int(m.group(2))
    _, _, cores, three_d = CHIPS[gen]
    chips = n // cores
    if chips * cores != n or chips < 1 or chips & (chips - 1):
        raise ValueError(f"{name}: {n} is not a power-of-two number of {'TensorCores' if cores > 1 else 'chips'}")
    dims = [1, 1, 1] if three_d else [1, 1]
    i = 0
    while math.prod(dims) < chips:  # grow the smallest axis first: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4 ...
        dims[dims.index(min(dims))] *= 2
        i += 1
    dims = sorted(dims)
    if three_d and chips == 4:
        dims = [2, 2, 1]
    return gen, f"{gen}:{'x'.join(map(str, dims))}"


def topology_devices(raw: str):
    from jax.experimental import topologies

    gen = raw.split(":")[0]
    dims = [int(d) for d in raw.split(":")[1].split("x")]
    host = (2, 2, 1) if len(dims) == 3 else (min(dims[0], 2), min(dims[1], 2), 1)
    if math.prod(dims) < 4:
        host = tuple(dims) + (1,) * (3 - len(dims))
    kw = {"chip_config_name": "megacore"} if CHIPS[gen][2] == 2 else {}  # v4, v5p: one device per chip (2 cores)
    return topologies.get_topology_desc(raw, "tpu", chips_per_host_bounds=host, num_slices=1, **kw).devices


def source_config(c) -> model_lib.ModelConfig | None:
    """The source model's config without its weights: config.source's config.json, else config.arch, else None."""
    from rrt.formats import hf

    src = c.source or ""
    if src and os.path.isfile(os.path.join(src, "config.json")):
        return hf.config_from_hf(hf.read_config(src))
    if c.get("arch"):
        return hf.config_from_hf(c.arch.to_dict() if hasattr(c.arch, "to_dict") else dict(c.arch))
    if c.source:
        raise ValueError(f"config.source={c.source!r} has no config.json and config.arch is empty")
    return None


def _shard_bytes(tree) -> int:
    return int(
        sum(np.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))
    )


def _shape_bytes(text: str) -> float:
    total = 0.0
    for dt, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", text):
        if dt in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dt] * (math.prod(int(d) for d in dims.split(",") if d) if dims else 1)
    return total


def collectives(hlo: str) -> dict[str, dict[str, float]]:
    """{kind: {count, bytes}} of the collectives in compiled HLO text (result shapes; an async pair counted once)."""
    out = collections.defaultdict(lambda: {"count": 0, "bytes": 0.0})
    pat = re.compile(
        r"=\s*(\([^=]*?\)|[a-z0-9]+\[[\d,]*\](?:\{[^}]*\})?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\("
    )
    for shape, kind, start in pat.findall(hlo):
        if start and shape.startswith("("):  # (operand(s), result(s)[, contexts]): the largest part is the result
            parts = re.findall(r"[a-z0-9]+\[[\d,]*\]", shape)
            b = max((_shape_bytes(p) for p in parts), default=0.0)
        else:
            b = _shape_bytes(shape)
        out[kind]["count"] += 1
        out[kind]["bytes"] += b
    return {k: dict(out[k]) for k in COLLECTIVES if k in out}


_COMP_HEAD = re.compile(r"^(?:ENTRY )?%([^\s(]+) \(.*\{\s*$")
_CALLEE = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)=%([^\s,)}]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE = re.compile(r"condition=%([^\s,)}]+), body=%([^\s,)}]+)")


def _computations(hlo: str) -> tuple[dict[str, str], str | None]:
    """({computation name: its text}, the ENTRY computation's name) of HLO module text."""
    comps, entry, name, lines = {}, None, None, []
    for line in hlo.splitlines():
        m = _COMP_HEAD.match(line)
        if m:
            name, lines = m.group(1), []
            entry = name if line.startswith("ENTRY") else entry
        elif name is not None and line.startswith("}"):
            comps[name], name = "\n".join(lines), None
        elif name is not None:
            lines.append(line)
    return comps, entry


def _trip_count(cond: str) -> int | None:
    """A while loop's trip count from its condition: `ROOT compare(counter, constant(N)), direction=LT` (the form
    lax.scan and fori_loop lower to, counting from 0); None when the condition has another form."""
    root = next((ln for ln in cond.splitlines() if "ROOT" in ln and "direction=LT" in ln), None)
    if root is None:
        return None
    consts = dict(re.findall(r"%(\S+) = s32\[\]\S* constant\((\d+)\)", cond))
    args = re.findall(r"compare\(%(\S+), %(\S+)\)", root)
    return int(consts[args[0][1]]) if args and args[0][1] in consts else None


def collectives_per_step(hlo: str) -> dict:
    """Collectives weighted by how often they run in one step: {kind: {count, bytes}} where an op inside a while
    body counts its loop's trip count times (nested loops multiply; trip counts read from the loop conditions, see
    `_trip_count`), and "unknown_trip_counts": the loops whose count could not be read (weighted 1)."""
    comps, entry = _computations(hlo)
    if entry is None:
        return {"unknown_trip_counts": 0}
    weight: dict[str, float] = collections.defaultdict(float)
    weight[entry] = 1.0
    unknown = 0
    order, seen = [entry], {entry}
    while order:  # computations form a DAG from ENTRY; propagate weights breadth first over the call edges
        name = order.pop(0)
        text = comps.get(name, "")
        edges = []
        for cond, body in _WHILE.findall(text):
            n = _trip_count(comps.get(cond, ""))
            unknown += n is None
            edges.append((body, n if n is not None else 1))
        whiles = {b for _, b in _WHILE.findall(text)}
        for kind, callee in _CALLEE.findall(text):
            if kind != "body" and callee not in whiles:
                edges.append((callee, 1))
        for group in _BRANCHES.findall(text):
            edges += [(c.strip().lstrip("%"), 1) for c in group.split(",") if c.strip()]
        for callee, n in edges:
            weight[callee] += weight[name] * n
            if callee not in seen:
                seen.add(callee)
                order.append(callee)
    out = collections.defaultdict(lambda: {"count": 0.0, "bytes": 0.0})
    for name, text in comps.items():
        if weight.get(name):
            for kind, v in collectives(text).items():
                out[kind]["count"] += v["count"] * weight[name]
                out[kind]["bytes"] += v["bytes"] * weight[name]
    return {**{k: dict(out[k]) for k in COLLECTIVES if k in out}, "unknown_trip_counts": unknown}


def _largest_buffers(hlo: str, n: int = 8) -> list[str]:
    """The largest values in the compiled HLO (instruction, shape, bytes): where the memory goes."""
    seen = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z0-9]+\[[\d,]*\])", line)
        if m:
            seen.append((_shape_bytes(m.group(2)), m.group(1), m.group(2)))
    seen.sort(reverse=True)
    return [f"{name} {shape} {b / GIB:.2f} GiB" for b, name, shape in seen[:n]]


def analyze(c, topology: str) -> dict:
    gen, raw = parse_topology(topology)
    hbm, peak, _, _ = CHIPS[gen]
    devices = topology_devices(raw)
    mesh = sharding_lib.make_mesh(tuple(c.mesh), devices=devices)
    base = source_config(c)
    cfg, _ = train.model_config(c, base)
    if c.loss.kd_weight > 0 and base is None:
        raise ValueError("loss.kd_weight > 0 needs a source model to distil from")
    teacher_cfg = base if c.loss.kd_weight > 0 else None
    if c.data.global_batch_size % c.grad_accum:
        raise ValueError(f"data.global_batch_size={c.data.global_batch_size} not divisible by grad_accum")
    st = train.build_step(c, cfg, teacher_cfg, mesh)
    with_sh = lambda t, s: jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t, s)  # noqa: E731
    params = with_sh(st.abstract_params, st.param_sh)
    opt_state = with_sh(st.abstract_opt, st.opt_sh)
    teacher = with_sh(st.teacher_abstract, st.teacher_sh) if teacher_cfg is not None else None
    B, T = c.data.global_batch_size, c.data.seq_len
    bsh = sharding_lib.batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct((B, T), np.float32 if k == "loss_mask" else np.int32, sharding=bsh)
        for k in packing.BATCH_KEYS
    }
    log_flag = jax.ShapeDtypeStruct((), np.bool_)
    t0 = time.perf_counter()
    lowered = st.step_fn.lower(params, opt_state, teacher, batch, log_flag)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program that exceeds HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {
            "config": {"topology": topology, "raw": raw, "generation": gen, "chips": len(devices)},
            "mesh": dict(zip(sharding_lib.MESH_AXES, (int(s) for s in mesh.devices.shape))),
            "fits": False,
            "error": str(e).splitlines()[0],
            "per_chip_bytes": {"params": _shard_bytes(params), "opt_state": _shard_bytes(opt_state), "hbm": hbm},
            "largest_buffers": _largest_buffers(lowered.as_text(dialect="hlo")) + ["(global shapes, before SPMD)"],
            "compile_s": {"lower": t1 - t0, "compile": time.perf_counter() - t1},
        }
    t2 = time.perf_counter()

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = dict(cost or {})
    hlo = compiled.as_text()
    arg = int(mem.argument_size_in_bytes)
    out = int(mem.output_size_in_bytes)
    alias = int(mem.alias_size_in_bytes)
    temp = int(mem.temp_size_in_bytes)
    code = int(getattr(mem, "generated_code_size_in_bytes", 0))
    total = arg + out - alias + temp + code
    n = len(devices)
    trained_heads = sum(w > 0 for w in losses.loop_weights(cfg.n_loops, st.loss_cfg.exit_weight))
    rrt_per_token = flops_lib.train_flops_per_token(cfg, T, trained_heads, st.teacher_cfg)
    xla_flops = float(cost.get("flops", 0.0))  # per chip (the SPMD-partitioned program)
    step_s = None
    for key in ("optimal_seconds", "estimated_seconds"):
        if cost.get(key, 0) and cost[key] > 0:
            step_s = float(cost[key])
            break
    rrt_step = rrt_per_token * B * T
    report = {
        "config": {"topology": topology, "raw": raw, "generation": gen, "chips": n},
        "mesh": dict(zip(sharding_lib.MESH_AXES, (int(s) for s in mesh.devices.shape))),
        "model": {"n_shared": cfg.n_shared, "n_loops": cfg.n_loops, "remat": cfg.remat, "dtype": cfg.dtype},
        "batch": {"global_batch_size": B, "seq_len": T, "grad_accum": c.grad_accum, "tokens": B * T},
        "gather_shared": bool(c.gather_shared),
        "kd_teacher": teacher_cfg is not None,
        "per_chip_bytes": {
            "params": _shard_bytes(params),
            "opt_state": _shard_bytes(opt_state),
            "teacher": _shard_bytes(teacher) if teacher is not None else 0,
            "batch": _shard_bytes(batch),
            "arguments": arg,
            "outputs": out,
            "aliased": alias,
            "temporaries": temp,
            "code": code,
            "total": total,
            "hbm": hbm,
            "headroom": hbm - total,
        },
        "fits": total <= hbm,
        "flops": {
            "xla_per_chip": xla_flops,
            "xla_per_step": xla_flops * n,
            "rrt_per_step": rrt_step,
            "rrt_per_token": rrt_per_token,
            "xla_per_token": xla_flops * n / (B * T),
        },
        "step_time_s": step_s,
        "step_time_s_at_40pct_mfu": rrt_step / (n * peak * 0.4),
        "hours_for_steps_at_40pct_mfu": c.steps * rrt_step / (n * peak * 0.4) / 3600,
        "peak_flops_per_chip": peak,
        "mfu_at_step_time": (rrt_step / (step_s * n * peak)) if step_s else None,
        "collectives": collectives(hlo),
        "collectives_per_step": collectives_per_step(hlo),
        "mosaic_kernels": hlo.count('custom_call_target="tpu_custom_call"'),  # Pallas calls: splash attention
        "compile_s": {"lower": t1 - t0, "compile": t2 - t1},
        "xla_optimal_seconds": float(cost.get("optimal_seconds", -1.0)),
    }
    if not report["fits"]:
        report["largest_buffers"] = _largest_buffers(hlo)
    return report


def table(r: dict) -> str:
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    if "error" in r:
        m = r["per_chip_bytes"]
        return "\n".join(
            [
                f"topology {r['config']['topology']} ({r['config']['chips']} chips), mesh {r['mesh']}",
                f"DOES NOT FIT: {r['error']}",
                f"per chip: params {g(m['params'])}, optimizer state {g(m['opt_state'])}, HBM {g(m['hbm'])}",
                "largest buffers:",
            ]
            + [f"  {b}" for b in r["largest_buffers"]]
        )
    m = r["per_chip_bytes"]
    f = r["flops"]
    lines = [
        f"topology {r['config']['topology']} ({r['config']['raw']}, {r['config']['chips']} chips), mesh {r['mesh']}, "
        f"batch {r['batch']['global_batch_size']} x {r['batch']['seq_len']} (grad_accum {r['batch']['grad_accum']}), "
        f"remat {r['model']['remat']}, gather_shared {r['gather_shared']}, KD teacher {r['kd_teacher']}",
        "per chip:",
    ]
    for k in ("params", "opt_state", "teacher", "batch", "arguments", "outputs", "temporaries", "total", "hbm"):
        lines.append(f"  {k:<12}{g(m[k])}")
    lines.append(f"  {'headroom':<12}{g(m['headroom'])}   fits: {r['fits']}")
    lines.append(
        f"FLOPs per step: XLA {f['xla_per_step']:.3e} (per chip {f['xla_per_chip']:.3e}), rrt/flops.py "
        f"{f['rrt_per_step']:.3e}; per token XLA {f['xla_per_token']:.3e}, rrt {f['rrt_per_token']:.3e}"
    )
    if r["step_time_s"]:
        lines.append(f"XLA estimated step time {r['step_time_s']:.3f} s -> MFU {r['mfu_at_step_time']:.1%}")
    else:
        lines.append("XLA estimated step time: not given by this backend's cost analysis")
    lines.append(
        f"at 40% MFU (rrt/flops.py): {r['step_time_s_at_40pct_mfu']:.2f} s per step, "
        f"{r['hours_for_steps_at_40pct_mfu']:.1f} h for config.steps"
    )
    lines.append("collectives (per chip, ops in the compiled HLO, loop bodies counted once):")
    per_step = r["collectives_per_step"]
    for k, v in r["collectives"].items():
        w = per_step.get(k, {"count": 0, "bytes": 0})
        lines.append(
            f"  {k:<20}{v['count']:5d} ops {v['bytes'] / 2**20:12.1f} MiB   per step (loops x trip count): "
            f"{w['count']:7.0f} ops {w['bytes'] / 2**20:12.1f} MiB"
        )
    if per_step["unknown_trip_counts"]:
        lines.append(f"  ({per_step['unknown_trip_counts']} loops of unknown trip count weighted 1)")
    if r["mosaic_kernels"]:
        lines.append(f"Pallas (Mosaic) kernel calls in the HLO: {r['mosaic_kernels']}")
    lines.append(f"compile: lower {r['compile_s']['lower']:.1f} s, compile {r['compile_s']['compile']:.1f} s")
    if not r["fits"]:
        lines.append("DOES NOT FIT; largest buffers:")
        lines += [f"  {b}" for b in r["largest_buffers"]]
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    if not _TOPOLOGY.value:
        raise app.UsageError("--topology is required")
    r = analyze(_CONFIG.value, _TOPOLOGY.value)
    print(table(r), flush=True)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as fh:
            json.dump(r, fh, indent=2)
    if not r["fits"]:
        sys.exit(1)


def run():
    if any(a in train._HELP for a in sys.argv[1:]):  # absl's --help exits 1 and, under a console script, shows nothing
        print(__doc__)
        print(flags.FLAGS.module_help(__name__))
        return
    from rrt import config as config_lib

    config_lib.install_config_flag_resolution()  # --config <preset name> works from any directory
    app.run(main)


if __name__ == "__main__":
    run()
