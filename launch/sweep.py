"""Sweeps: one training run per point of a grid of config overrides, each in its own workdir.

    python launch/sweep.py launch/sweeps/example.py --base_workdir runs/sweep1 [--config configs/x.py] \
        [--launcher local|tpu_pod|slurm] [--max_parallel N] [--dry-run] [-- LAUNCHER FLAGS]

A sweep file defines `get_sweep()`, returning a list of override dicts ({"optim.lr": 1e-3, ...}) built with `grid`,
`zip_` and `product` below, and optionally `CONFIG`, the config file (`--config` wins). Each point runs in
BASE_WORKDIR/<name>, the name spelled from its overrides (`optim.lr=0.001,recursion.loops=2`), so it does not depend
on the point's position and rerunning the sweep resumes every run. BASE_WORKDIR/manifest.json lists the points:
index, overrides, name, workdir, and the command that runs (or resumes) that point alone.

Launchers: `local` runs `launch/local.sh` for each point, `--max_parallel` at a time (their output goes to each
workdir's train.log); `tpu_pod` starts all points one after another on one slice, in one detached job (flags after
`--`: --tpu, --zone, ...); `slurm` writes one sbatch script per point and, with `-- ... --submit`, queues them all.
"""

import argparse
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python launch/sweep.py`: make `launch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launch import common, slurm, tpu_pod  # noqa: E402

LOCAL_SH = common.REPO / "launch" / "local.sh"
MAX_NAME = 120  # longer names are cut and get a hash of the full name, to stay unique and under file-name limits

# --- Building sweeps -----------------------------------------------------------------------------------------------


def _axes(axes: dict[str, Any]) -> dict[str, list]:
    """Checked axes: dotted config keys (`optim__lr` is spelled `optim.lr`), each a non-empty list of values."""
    out = {}
    for key, values in axes.items():
        key = key.replace("__", ".")
        if not all(part.isidentifier() for part in key.split(".")):
            raise ValueError(f"sweep key {key!r} is not a dotted config path like 'optim.lr'")
        if isinstance(values, str | bytes | dict) or not isinstance(values, Sequence):
            raise ValueError(f"sweep axis {key!r} must be a list of values, got {values!r}")
        if not values:
            raise ValueError(f"sweep axis {key!r} has no values")
        out[key] = list(values)
    return out


def grid(**axes: Sequence) -> list[dict]:
    """Every combination of the axes' values, the last axis varying fastest: grid(a=[1, 2], b=[3]) has 2 points."""
    axes = _axes(axes)
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def zip_(**axes: Sequence) -> list[dict]:
    """The axes' values paired position by position; all axes must have the same length."""
    axes = _axes(axes)
    lengths = {key: len(values) for key, values in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zip_ needs axes of equal length, got {lengths}")
    return [dict(zip(axes, values, strict=True)) for values in zip(*axes.values(), strict=True)]


def product(*sweeps: list[dict]) -> list[dict]:
    """Every combination of one point from each sweep, merged; a key may come from only one sweep."""
    points = [{}]
    for sweep in sweeps:
        merged = []
        for a, b in itertools.product(points, sweep):
            if both := a.keys() & b.keys():
                raise ValueError(f"product: key(s) {sorted(both)} set by more than one sweep")
            merged.append({**a, **b})
        points = merged
    return points


# --- Expanding a sweep into runs -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    index: int
    overrides: dict
    name: str
    workdir: str

    @property
    def args(self) -> list[str]:
        return override_args(self.overrides)


def format_value(value: Any) -> str:
    """A value as ml_collections parses it on the command line: strings raw, everything else as its repr."""
    return value if isinstance(value, str) else repr(value)


def override_args(overrides: dict) -> list[str]:
    return [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]


def run_name(overrides: dict) -> str:
    """A stable, file-name-safe name for a point: `key=value` pairs in the sweep's key order, joined by commas.

    Keys are shortened to their last component (`optim.lr` -> `lr`) unless two of the point's keys share it.
    """
    last = [key.rsplit(".", 1)[-1] for key in overrides]
    short = [k if last.count(k) == 1 else key for k, key in zip(last, overrides, strict=True)]
    full = ",".join(f"{k}={format_value(v)}" for k, v in zip(short, overrides.values(), strict=True)) or "base"
    name = common.safe_name(full)
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 9] + "-" + hashlib.sha1(full.encode()).hexdigest()[:8]
    return name


def expand(points: list[dict], base_workdir: str) -> list[Point]:
    """Points -> runs, each with its own workdir under `base_workdir`; fails on duplicate points or names."""
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ValueError(f"get_sweep() must return a list of override dicts, got {type(points).__name__}")
    if not points:
        raise ValueError("get_sweep() returned no points")
    runs, seen = [], {}
    for i, overrides in enumerate(points):
        _axes({key: [value] for key, value in overrides.items()})  # the same key checks as grid()
        name = run_name(overrides)
        if name in seen:
            raise ValueError(
                f"points {seen[name]} and {i} share the run name {name!r}: {points[seen[name]]}, {overrides}"
            )
        seen[name] = i
        runs.append(Point(i, overrides, name, base_workdir.rstrip("/") + "/" + name))
    return runs


def load_sweep(path: str) -> tuple[list[dict], str | None]:
    """(the points of `get_sweep()`, the file's CONFIG or None) of a sweep file."""
    if not os.path.isfile(path):
        raise common.LaunchError(f"unknown sweep file {path!r}")
    spec = importlib.util.spec_from_file_location(f"sweep_file_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_sweep", None)):
        raise common.LaunchError(f"sweep file {path} defines no get_sweep()")
    return module.get_sweep(), getattr(module, "CONFIG", None)


# --- Launching -------------------------------------------------------------------------------------------------------


def local_argv(config: str, point: Point) -> list[str]:
    return [str(LOCAL_SH), config, point.workdir, *point.args]


def run_local(commands: list[list[str]], max_parallel: int) -> int:
    """Run the commands, `max_parallel` at a time; returns the number that failed."""
    quiet = max_parallel > 1  # interleaved output is unreadable; each run still logs to its workdir's train.log
    pending, running, failed = list(commands), [], 0
    while pending or running:
        while pending and len(running) < max_parallel:
            argv = pending.pop(0)
            print(shlex.join(argv), flush=True)
            out = subprocess.DEVNULL if quiet else None
            running.append((argv, subprocess.Popen(argv, stdout=out, stderr=out)))
        for argv, proc in list(running):
            if proc.poll() is not None:
                running.remove((argv, proc))
                if proc.returncode:
                    failed += 1
                    common.warn(f"exit status {proc.returncode}: {shlex.join(argv)}")
        time.sleep(0.05)
    return failed


def manifest(args: argparse.Namespace, config: str, points: list[Point], commands: list[list[str]]) -> dict:
    """manifest.json: the sweep, and per point its index, overrides, name, workdir and standalone command."""
    return {
        "sweep": args.sweep_file,
        "config": config,
        "launcher": args.launcher,
        "base_workdir": args.base_workdir,
        "points": [
            {"index": p.index, "overrides": p.overrides, "name": p.name, "workdir": p.workdir, "command": shlex.join(c)}
            for p, c in zip(points, commands, strict=True)
        ],
    }


def manifest_path(base_workdir: str) -> str:
    return base_workdir.rstrip("/") + "/manifest.json"


def write_manifest(base_workdir: str, content: dict, dry_run: bool) -> None:
    """Into a local base_workdir, or with `gcloud storage cp` into a bucket."""
    path = manifest_path(base_workdir)
    text = json.dumps(content, indent=2) + "\n"
    if common.is_remote(path):
        argv = ["gcloud", "storage", "cp", "-", path]
        print(shlex.join(argv), flush=True)
        if not dry_run:
            subprocess.run(argv, input=text, text=True, check=True)
    elif not dry_run:
        os.makedirs(base_workdir, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    print(f"# {'would write' if dry_run else 'wrote'} {path}", file=sys.stderr)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__.splitlines()[0])
    p.add_argument("sweep_file", help="a .py file defining get_sweep() (e.g. launch/sweeps/example.py)")
    p.add_argument("--base_workdir", required=True, help="each point runs in BASE_WORKDIR/<point name>")
    p.add_argument("--config", default=None, help="config file (default: the sweep file's CONFIG)")
    p.add_argument("--launcher", choices=("local", "tpu_pod", "slurm"), default="local")
    p.add_argument("--max_parallel", type=int, default=1, help="local launcher: runs at a time")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    if args.max_parallel < 1:
        p.error(f"--max_parallel must be >= 1, got {args.max_parallel}")
    if args.max_parallel > 1 and args.launcher != "local":
        p.error("--max_parallel is for the local launcher (SLURM queues every point; a TPU slice runs one at a time)")
    if args.launcher == "local" and rest:
        p.error(f"the local launcher takes no flags after --, got {shlex.join(rest)}")
    return args, rest


def launcher_args(launcher: str, rest: list[str], dry_run: bool) -> argparse.Namespace:
    """The TPU or SLURM launcher's own flags, given after `--`."""
    p = argparse.ArgumentParser(prog=f"launch/sweep.py ... --launcher {launcher} --")
    (tpu_pod.add_slice_args if launcher == "tpu_pod" else slurm.add_cluster_args)(p)
    args = p.parse_args(rest)
    args.dry_run = dry_run or getattr(args, "dry_run", False)
    return args


def launch_local(args: argparse.Namespace, config: str, points: list[Point]) -> int:
    commands = [local_argv(config, p) for p in points]
    write_manifest(args.base_workdir, manifest(args, config, points, commands), args.dry_run)
    if args.dry_run:
        common.run_plan(commands, dry_run=True)
        return 0
    failed = run_local(commands, args.max_parallel)
    print(f"{len(points) - failed}/{len(points)} runs exited cleanly", file=sys.stderr)
    return 1 if failed else 0


def launch_slurm(args: argparse.Namespace, rest: list[str], config: str, points: list[Point]) -> int:
    largs = launcher_args("slurm", rest, args.dry_run)
    commands = [
        ["python", "launch/slurm.py", *rest, "--config", config, "--workdir", p.workdir, "--", *p.args] for p in points
    ]
    write_manifest(args.base_workdir, manifest(args, config, points, commands), largs.dry_run)
    for p in points:
        slurm.launch(largs, config, p.workdir, p.args)
    return 0


def launch_tpu_pod(args: argparse.Namespace, rest: list[str], config: str, points: list[Point]) -> int:
    """All points, one after another, in one detached job on the slice; the workers write the manifest."""
    largs = launcher_args("tpu_pod", rest, args.dry_run)
    common.check_pod_workdir(args.base_workdir, "--base_workdir")
    config = common.repo_relative_config(config, common.REPO)
    if not largs.skip_setup:
        tpu_pod.check_committed(common.REPO, [config])
    commands = [
        ["python", "launch/tpu_pod.py", *rest, "--config", config, "--workdir", p.workdir, "--", *p.args]
        for p in points
    ]
    content = manifest(args, config, points, commands)
    prelude = []
    if common.is_remote(args.base_workdir):
        write_manifest(args.base_workdir, content, args.dry_run)
    else:  # a path on the workers' (shared) filesystem: they write it, on one line so the command stays on one
        text, path = json.dumps(content), manifest_path(args.base_workdir)
        prelude = [shlex.join(["mkdir", "-p", args.base_workdir]), f"echo {shlex.quote(text)} > {shlex.quote(path)}"]
    runs = [tpu_pod.Run(config, p.workdir, tuple(p.args)) for p in points]
    target = tpu_pod.Slice(largs.tpu, largs.zone, largs.project)
    name = tpu_pod.log_name(args.base_workdir)
    common.run_plan(tpu_pod.plan(target, runs, name, common.REPO, not largs.skip_setup, prelude), args.dry_run)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parse_args(argv)
    try:
        raw_points, default_config = load_sweep(args.sweep_file)
        config = args.config or default_config
        if not config:
            raise common.LaunchError(f"give --config: {args.sweep_file} sets no CONFIG")
        common.check_config(config)
        points = expand(raw_points, args.base_workdir)
        if args.launcher == "local":
            return launch_local(args, config, points)
        if args.launcher == "slurm":
            return launch_slurm(args, rest, config, points)
        return launch_tpu_pod(args, rest, config, points)
    except (common.LaunchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
