"""All-gathers executed per training step, read from the compiled HLO: `python tests/allgather_count.py`.

Compiles the tiny config's real train step (`rrt.train.train_step`, jitted as `rrt.train.main` does) on 8 fake CPU
devices, once without and once with `gather_shared`, and prints one JSON line per variant. Nothing runs: only
`lower(...).compile().as_text()`.

Counting. The optimized HLO is a set of computations; ENTRY calls others through `while` (body and condition),
`call`, `conditional` and fusions. An op inside a while body executes once per iteration, so
    executed(computation) = its own all-gathers + sum over its while ops of trip_count * executed(body)
                            + sum over other callees of executed(callee)
with trip counts from XLA's `known_trip_count` annotation (every scan here has a static length; a while without one
is reported in `unknown_trip_counts` and counted once). Async pairs count once (`all-gather-start`, not `-done`);
a combined (tuple) all-gather counts as one op, so bytes gathered are reported too (result bytes per device).
"""

import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import collections
import functools
import json
import re

import numpy as np

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\([^{]*\))?.*\{\s*$")
_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def parse_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines}, and the ENTRY computation's name."""
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        stripped = line.strip()
        if current is None:
            m = _COMP.match(stripped)
            if m and not stripped.startswith(("HloModule", "//")):
                current = m.group(1)
                comps[current] = []
                if stripped.startswith("ENTRY"):
                    entry = current
        elif stripped == "}":
            current = None
        else:
            comps[current].append(stripped)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _op(line: str) -> str:
    """The opcode of an instruction line `%name = <shape> opcode(operands), attrs`."""
    rhs = line.split("=", 1)[1] if "=" in line else line
    m = re.search(r"\)?\s*([a-z][\w\-]*)\(", rhs)
    return m.group(1) if m else ""


def _result_shapes(line: str) -> list[tuple[str, tuple[int, ...]]]:
    rhs = line.split("=", 1)[1]
    shape_part = rhs[: rhs.index(_op(line) + "(")]
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _SHAPE.findall(shape_part)]


def executed_collectives(hlo: str, opcode: str = "all-gather") -> dict:
    """{"ops": executed ops per step, "bytes": result bytes per device, "static_ops": ops in the text,
    "by_shape": {"f32[2,64,128]": executed arrays of that shape}, "unknown_trip_counts": [...]}."""
    comps, entry = parse_computations(hlo)
    unknown: list[str] = []

    @functools.cache
    def count(name: str) -> tuple[int, collections.Counter]:
        ops, shapes = 0, collections.Counter()
        for line in comps.get(name, []):
            op = _op(line)
            if op in (opcode, opcode + "-start"):
                ops += 1
                shapes.update(f"{t}[{','.join(map(str, d))}]" for t, d in _result_shapes(line))
            callees = [c for kind, c in _CALLEES.findall(line) if kind != "to_apply" or op == "call"]
            m = _BRANCHES.search(line)
            if m:
                callees += [c.strip().lstrip("%") for c in m.group(1).split(",")]
            trip = 1
            if op == "while":
                t = _TRIP.search(line)
                if t:
                    trip = int(t.group(1))
                else:
                    unknown.append(line.split("=", 1)[0].strip())
            for callee in callees:
                o, sh = count(callee)
                ops += trip * o
                shapes.update({k: trip * v for k, v in sh.items()})
        return ops, shapes

    ops, shapes = count(entry)
    static = sum(1 for lines in comps.values() for line in lines if _op(line) in (opcode, opcode + "-start"))
    nbytes = sum(n * _bytes(s) for s, n in shapes.items())
    by_shape = dict(sorted(shapes.items(), key=lambda kv: -kv[1]))
    return {"ops": ops, "bytes": nbytes, "static_ops": static, "by_shape": by_shape, "unknown_trip_counts": unknown}


def _bytes(shape: str) -> int:
    t, dims = shape.rstrip("]").split("[")
    return DTYPE_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))


def compiled_step_hlo(mesh_shape=(1, 8, 1), gather_shared: bool = True, overrides: dict | None = None) -> str:
    """The optimized HLO text of the tiny config's train step on a mesh of fake devices."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from rrt import config as config_lib
    from rrt import model as model_lib
    from rrt import optim as optim_lib
    from rrt import sharding as sharding_lib
    from rrt import train

    c = config_lib.preset("tiny")
    for k, v in (overrides or {}).items():
        c[k] = v
    mesh = sharding_lib.make_mesh(mesh_shape)
    cfg, _ = train.model_config(c, None)
    graphdef, state = nnx.split(model_lib.abstract(cfg))
    params = nnx.to_pure_dict(state)
    param_sh = sharding_lib.param_shardings(params, mesh)
    opt_cfg = optim_lib.OptimConfig(**dict(c.optim), total_steps=c.steps)
    opt, _ = optim_lib.make(opt_cfg, params)
    opt_state = jax.eval_shape(opt.init, params)
    opt_sh = sharding_lib.opt_state_shardings(opt, opt_state, param_sh, mesh)
    loss_cfg = train.LossConfig(c.loss.kd_weight, c.loss.kd_temperature, c.loss.exit_weight)
    step = jax.jit(
        functools.partial(
            train.train_step,
            opt=opt,
            n_micro=c.grad_accum,
            n_loops=cfg.n_loops,
            graphdef=graphdef,
            teacher_graphdef=None,
            loss_cfg=loss_cfg,
            constrain=sharding_lib.shared_gather_constraint(mesh) if gather_shared else None,
            constrain_hiddens=sharding_lib.activation_constraint(mesh, (None, "batch", "time", None)),
        ),
        out_shardings=(param_sh, opt_sh, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=(0, 1),
    )
    with_sh = lambda t, s: jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t, s)  # noqa: E731
    b, t = c.data.global_batch_size, c.data.seq_len
    batch_sh = sharding_lib.batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct((b, t), np.float32 if k == "loss_mask" else np.int32, sharding=batch_sh)
        for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    }
    return step.lower(with_sh(params, param_sh), with_sh(opt_state, opt_sh), None, batch).compile().as_text()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor")
    p.add_argument("--dump", default="", help="write each variant's HLO text to <dump>.<variant>.hlo")
    a = p.parse_args()
    mesh = tuple(int(x) for x in a.mesh.split(","))
    for gather_shared in (False, True):
        hlo = compiled_step_hlo(mesh, gather_shared)
        if a.dump:
            with open(f"{a.dump}.gather_shared_{gather_shared}.hlo", "w") as f:
                f.write(hlo)
        result = {"mesh": list(mesh), "gather_shared": gather_shared}
        for opcode in ("all-gather", "reduce-scatter", "all-reduce"):
            r = executed_collectives(hlo, opcode)
            result[opcode] = {k: r[k] for k in ("ops", "bytes", "static_ops", "by_shape")}
            if r["unknown_trip_counts"]:
                result[opcode]["unknown_trip_counts"] = r["unknown_trip_counts"]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
