"""Run (or resume) training on a SLURM GPU cluster: render an sbatch script, write it into the workdir, submit it.

    python launch/slurm.py --nodes 4 --gpus_per_node 8 --partition gpu --time 24:00:00 \
        --config configs/x.py --workdir runs/x [--dry-run | --submit] [-- --config.x=y ...]

Without `--submit` the script is written to WORKDIR/slurm.sbatch and the `sbatch` command printed; with it, also run.
`--dry-run` writes nothing and prints the commands (stdout) and the script (stderr). The job runs one task per GPU
(`jax.distributed.initialize()` reads SLURM_* and pins each process to GPU SLURM_LOCALID), requeues itself near its
time limit after the tasks checkpoint on SIGTERM, and is requeued on preemption; its log is WORKDIR/slurm-<jobid>.out,
appended across requeues. The repository, its .venv (with `jax[cuda12]`, docs/LAUNCHING.md) and WORKDIR must be on
a filesystem every node shares.
"""

import argparse
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/slurm.py`: make `launch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launch import common  # noqa: E402

TEMPLATE = Path(__file__).resolve().parent / "slurm_template.sbatch"
SCRIPT_NAME = "slurm.sbatch"
TIME_RE = re.compile(r"(\d+-)?\d{1,2}:\d{2}:\d{2}")


def render(
    *,
    job_name: str,
    nodes: int,
    gpus_per_node: int,
    partition: str,
    time: str,
    log: str,
    repo: str,
    train_argv: Sequence[str],
    setup: Sequence[str] = (),
    sbatch_args: Sequence[str] = (),
    signal_seconds: int = 120,
    template: Path = TEMPLATE,
) -> str:
    """The sbatch script: the template's {{fields}} filled in (shell-quoted where they are shell words)."""
    fields = {
        "job_name": job_name,
        "nodes": str(nodes),
        "gpus_per_node": str(gpus_per_node),
        "partition": partition,
        "time": time,
        "log": log,
        "signal_seconds": str(signal_seconds),
        "repo": shlex.quote(repo),
        "train_command": shlex.join(train_argv),
        "setup": "\n".join(setup),
        "extra_sbatch": "\n".join(f"#SBATCH {a}" for a in sbatch_args),
    }
    for key in ("job_name", "partition", "log"):
        if any(c.isspace() for c in fields[key]):
            raise common.LaunchError(
                f"{key} may not contain whitespace (#SBATCH lines are not shell-quoted): {fields[key]!r}"
            )
    lines = []
    for line in template.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("{{") and stripped.endswith("}}") and not fields[stripped[2:-2]]:
            continue  # an empty optional block: no blank line among the #SBATCH directives
        lines.append(line)
    text = "\n".join(lines) + "\n"
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    if left := re.findall(r"\{\{\w+\}\}", text):
        raise ValueError(f"{template} has fields render() does not fill: {left}")
    return text


def check_args(args: argparse.Namespace) -> None:
    """Clear errors for values sbatch would reject later (or, worse, accept)."""
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise common.LaunchError(f"--nodes and --gpus_per_node must be >= 1, got {args.nodes}, {args.gpus_per_node}")
    if not TIME_RE.fullmatch(args.time):
        raise common.LaunchError(f"--time must be HH:MM:SS or D-HH:MM:SS, got {args.time!r}")
    if args.signal_seconds < 1:
        raise common.LaunchError(f"--signal_seconds must be positive, got {args.signal_seconds}")


def plan(args: argparse.Namespace, config: str, workdir: str, overrides: Sequence[str]) -> tuple[str, str, list]:
    """(script path, script text, commands) for one run; paths made absolute because the job runs from the repo."""
    check_args(args)
    common.check_config(config)
    common.check_overrides(overrides)
    if common.is_remote(workdir):
        raise common.LaunchError(f"--workdir must be a path on the cluster's shared filesystem, got {workdir!r}")
    repo = os.path.abspath(args.repo)
    workdir = os.path.abspath(workdir)
    config = common.config_for(config, Path(repo))
    python = args.python or os.path.join(repo, ".venv", "bin", "python")
    script = os.path.join(workdir, SCRIPT_NAME)
    text = render(
        job_name=args.job_name or "rrt-" + common.safe_name(os.path.basename(workdir)),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        time=args.time,
        log=os.path.join(workdir, "slurm-%j.out"),
        repo=repo,
        train_argv=common.train_argv(python, config, workdir, overrides),
        setup=args.setup,
        sbatch_args=args.sbatch_arg,
        signal_seconds=args.signal_seconds,
    )
    return script, text, [["sbatch", script]]


def launch(args: argparse.Namespace, config: str, workdir: str, overrides: Sequence[str]) -> None:
    """Write the script (unless --dry-run) and print the sbatch command; run it with --submit."""
    script, text, commands = plan(args, config, workdir, overrides)
    if args.dry_run:
        print(f"# {script}\n{text}", file=sys.stderr, end="")
    else:
        os.makedirs(os.path.dirname(script), exist_ok=True)
        with open(script, "w") as f:
            f.write(text)
        print(f"wrote {script}", file=sys.stderr)
    common.run_plan(commands, dry_run=args.dry_run or not args.submit)


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """The flags that size and place the job (shared with `launch/sweep.py --launcher slurm -- ...`)."""
    p.add_argument("--nodes", type=int, required=True, help="nodes")
    p.add_argument("--gpus_per_node", type=int, required=True, help="GPUs per node (one training process each)")
    p.add_argument("--partition", required=True, help="SLURM partition")
    p.add_argument("--time", required=True, help="time limit per job, HH:MM:SS or D-HH:MM:SS (it requeues itself)")
    p.add_argument("--job_name", default=None, help="default: rrt-<workdir name>")
    p.add_argument("--python", default=None, help="Python on the nodes (default: <repo>/.venv/bin/python)")
    p.add_argument("--repo", default=str(common.REPO), help="repository path on the shared filesystem")
    p.add_argument("--setup", action="append", default=[], help="shell line run before srun (repeatable)")
    p.add_argument("--sbatch_arg", action="append", default=[], help="extra #SBATCH option, e.g. --account=abc")
    p.add_argument("--signal_seconds", type=int, default=120, help="warning before the time limit, to checkpoint")
    p.add_argument("--submit", action="store_true", help="run sbatch (default: write the script, print the command)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="write and run nothing")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="launch/slurm.py", description=__doc__.splitlines()[0])
    add_cluster_args(p)
    p.add_argument("--config", required=True, help="config file, e.g. configs/recursive_gemma_1b.py")
    p.add_argument("--workdir", required=True, help="run directory on the shared filesystem; resubmit to resume")
    return p.parse_args(argv), overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        launch(args, args.config, args.workdir, overrides)
    except common.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
