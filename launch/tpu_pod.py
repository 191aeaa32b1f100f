"""Run (or resume) training on every worker of a Cloud TPU VM slice.

    python launch/tpu_pod.py --tpu NAME --zone ZONE [--project P] --config configs/x.py --workdir DIR \
        [--dry-run] [-- --config.x=y ...]
    python launch/tpu_pod.py --tpu NAME --zone ZONE --stop        # SIGTERM the run: it checkpoints and exits

The plan, every step printed (shell-quoted) before it runs:
  1. `git archive HEAD` into build/rrt-code.tar.gz: the committed tree, so every worker runs the same known commit
     (uncommitted changes are not shipped: a warning says so, and an uncommitted config is an error);
  2. `gcloud compute tpus tpu-vm scp` the tarball to every worker (`--worker=all`);
  3. on every worker, first refuse if a run is still going (before anything is touched), then replace the code
     directory ~/rrt/code with the tarball (the only thing the launcher ever deletes) and bring the venv ~/rrt/venv
     up to date with uv: Python 3.11 (TPU VM images ship 3.10), `-r requirements.txt` plus `jax[tpu]` pinned to
     requirements.txt's jax, CPU-only torch (a test-time reference); `--skip_setup` skips steps 1-3;
  4. on every worker, start the training command under `nohup setsid`, from ~/rrt/code, appending its output to
     ~/rrt_logs/<run>.<hostname>.log; the process group id goes to ~/rrt_logs/train.pid, which `--stop` signals and
     which keeps a second launch from starting while a run is still going.
No coordinator flags are needed: `jax.distributed.initialize()` finds the slice's workers from the TPU metadata.
DIR is a `gs://bucket/dir` URL, passed to the workers as it is (rrt.train writes checkpoints, logs and its lock there
through etils.epath; the setup installs gcsfs for that), or an absolute path shared by every worker (see
docs/LAUNCHING.md): a relative or `~` path would land in the code directory, which the next launch replaces.
Relaunching the same command resumes.
"""

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python launch/tpu_pod.py`: make `launch` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launch import common  # noqa: E402

LOCAL_TARBALL = "build/rrt-code.tar.gz"  # under the repository (build/ is git-ignored)
REMOTE_TARBALL = "/tmp/rrt-code.tar.gz"
REMOTE_HOME = "$HOME/rrt"
REMOTE_DIR = f"{REMOTE_HOME}/code"  # replaced by every launch; nothing else is deleted
REMOTE_VENV = f"{REMOTE_HOME}/venv"
PYTHON = "../venv/bin/python"  # REMOTE_VENV, from REMOTE_DIR (the runs' working directory)
LOG_DIR = "$HOME/rrt_logs"
PIDFILE = f"{LOG_DIR}/train.pid"
PYTHON_VERSION = "3.11"
TORCH_BACKEND = "cpu"
# etils.epath's gs:// backend when TensorFlow is absent; it brings google-cloud-storage, which Orbax imports for a
# gs:// checkpoint directory. Not in requirements.txt: a local or shared-filesystem workdir needs neither.
GCS_CLIENT = "gcsfs"
# Whether the pidfile's process is running (a zombie, left where nothing reaps it, does not count).
ALIVE = f'ps -o stat= -p "$(cat "{PIDFILE}")" 2>/dev/null | grep -q "^[^Z]"'
# Refuse (exit 1) while a run is going: checked before the code is replaced and before a run starts.
REFUSE_IF_RUNNING = (
    f'if [ -f "{PIDFILE}" ] && {ALIVE}; then '
    f'echo "$(hostname): a run is still going (pid $(cat "{PIDFILE}")); stop it first with --stop" >&2; '
    "exit 1; fi"
)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: the command `python -m rrt.train --config config --workdir workdir *overrides`."""

    config: str  # relative to the repository root
    workdir: str
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Slice:
    """Where the runs go: a TPU VM (single host or pod slice) and how to reach it."""

    tpu: str
    zone: str
    project: str | None = None

    def gcloud(self, verb: str, *args: str, worker: str = "all") -> list[str]:
        """`gcloud compute tpus tpu-vm VERB ...` on every worker of this slice (or on one)."""
        argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={self.zone}", f"--worker={worker}"]
        return argv + ([f"--project={self.project}"] if self.project else [])


def jax_version(requirements: Path) -> str:
    """The `jax==X` pin of requirements.txt, which `jax[tpu]` on the workers must match."""
    text = requirements.read_text()
    match = re.search(r"^jax==([^\s;#]+)", text, re.MULTILINE)
    if not match:
        raise common.LaunchError(f"{requirements} pins no jax==<version>; the workers' jax[tpu] must match it")
    return match.group(1)


def setup_script(jax_pin: str) -> str:
    """Worker shell: refuse while a run is going; else replace ~/rrt/code with the tarball (nothing else is deleted)
    and bring the venv ~/rrt/venv up to requirements.txt."""
    steps = [
        f'mkdir -p "{LOG_DIR}"',
        REFUSE_IF_RUNNING,
        f'rm -rf "{REMOTE_DIR}"',
        f'mkdir -p "{REMOTE_DIR}"',
        f'cd "{REMOTE_DIR}"',
        f"tar -xzf {REMOTE_TARBALL}",
        'export PATH="$HOME/.local/bin:$PATH"',
        "(command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh)",
        f'(test -x {PYTHON} || uv venv --python {PYTHON_VERSION} "{REMOTE_VENV}")',
        shlex.join(
            ["uv", "pip", "install", "--python", PYTHON, "--torch-backend", TORCH_BACKEND]
            + ["-r", "requirements.txt", f"jax[tpu]=={jax_pin}", GCS_CLIENT]
        ),
    ]
    return " && ".join(steps)


def run_script(runs: Sequence[Run], name: str, prelude: Sequence[str] = ()) -> str:
    """Worker shell: run `prelude`, then start the runs, one after another, detached from ssh, logging to a file."""
    if not runs:
        raise common.LaunchError("no runs to launch")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"log name must be a plain file name, got {name!r}")
    log = f'"{LOG_DIR}/{name}.$(hostname).log"'
    body = ["export PYTHONUNBUFFERED=1"]
    for i, run in enumerate(runs):
        if len(runs) > 1:
            body.append(shlex.join(["echo", f"=== run {i + 1}/{len(runs)}: {run.workdir}"]))
        # TPU VMs reached over ssh expose no variable that says "multi-host": tell rrt.train to initialize.
        body.append("export RRT_DISTRIBUTED_INIT=always")
        body.append(shlex.join(common.train_argv(PYTHON, run.config, run.workdir, run.overrides)))
    return "; ".join(
        [
            f'mkdir -p "{LOG_DIR}"',
            f'cd "{REMOTE_DIR}" || exit 1',
            REFUSE_IF_RUNNING,
            *prelude,
            # setsid: the run leads its own process group, so --stop signals all of it; nohup: ssh may disconnect.
            f'nohup setsid bash -c {shlex.quote("; ".join(body))} >> {log} 2>&1 < /dev/null & echo $! > "{PIDFILE}"',
            f'echo "$(hostname): started pid $!, log "{log}',
        ]
    )


def log_name(workdir: str) -> str:
    """The per-worker log file stem for a run in `workdir`: its last path component, made file-name safe."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", workdir.rstrip("/").rsplit("/", 1)[-1]) or "run"


def follow_command(target: Slice, name: str) -> list[str]:
    """The command that follows worker 0's log of the run named `name`."""
    return target.gcloud("ssh", target.tpu, "--command", f"tail -F {LOG_DIR}/{name}.*.log", worker="0")


def stop_script() -> str:
    """Worker shell: SIGTERM the run's process group (training saves a checkpoint and exits)."""
    return (
        f'if [ -f "{PIDFILE}" ] && kill -TERM -- -"$(cat "{PIDFILE}")" 2>/dev/null; '
        'then echo "$(hostname): sent SIGTERM"; else echo "$(hostname): no run going"; fi'
    )


def plan(
    target: Slice, runs: Sequence[Run], name: str, repo: Path, setup: bool = True, prelude: Sequence[str] = ()
) -> list[list[str]]:
    """The commands that ship the code, set up the workers and start `runs` there (in order), logging to `name`."""
    commands = []
    if setup:
        tarball = str(repo / LOCAL_TARBALL)
        commands += [
            ["mkdir", "-p", str(Path(tarball).parent)],
            ["git", "-C", str(repo), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
            target.gcloud("scp", tarball, f"{target.tpu}:{REMOTE_TARBALL}"),
            target.gcloud("ssh", target.tpu, "--command", setup_script(jax_version(repo / "requirements.txt"))),
        ]
    commands.append(target.gcloud("ssh", target.tpu, "--command", run_script(runs, name, prelude)))
    return commands


def check_committed(repo: Path, configs: Sequence[str]) -> None:
    """`git archive HEAD` ships commits only: error on an uncommitted config, warn on other local changes."""

    def git_status(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", *args], capture_output=True, text=True)
        if out.returncode:
            raise common.LaunchError(f"{repo} is not a git repository; the code is shipped with `git archive`")
        return out.stdout.strip()

    for config in sorted(set(configs)):
        path = common.config_file(config)
        if git_status("--", path):
            raise common.LaunchError(f"config {path} is untracked or modified; the workers get HEAD: commit it first")
    if git_status("--untracked-files=no"):
        common.warn("uncommitted changes in tracked files are not shipped (the workers get HEAD)")


def add_slice_args(p: argparse.ArgumentParser) -> None:
    """The flags that name the slice and the setup (shared with `launch/sweep.py --launcher tpu_pod -- ...`)."""
    p.add_argument("--tpu", required=True, help="TPU VM name (gcloud compute tpus tpu-vm list)")
    p.add_argument("--zone", required=True, help="its zone, e.g. us-west4-a")
    p.add_argument("--project", default=None, help="GCP project (default: gcloud's configured project)")
    p.add_argument("--skip_setup", action="store_true", help="do not ship the code or touch the venv; just run")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="launch/tpu_pod.py", description=__doc__.splitlines()[0])
    add_slice_args(p)
    p.add_argument("--config", help="a preset name or a config file inside the repository")
    p.add_argument(
        "--workdir", help="run directory: gs://bucket/dir or an absolute path shared by every worker; rerun to resume"
    )
    p.add_argument("--stop", action="store_true", help="SIGTERM the run going on the slice instead of starting one")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    if not args.stop and not (args.config and args.workdir):
        p.error("--config and --workdir are required (or --stop)")
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, overrides = parse_args(argv)
        target = Slice(args.tpu, args.zone, args.project)
        if args.stop:
            common.run_plan([target.gcloud("ssh", args.tpu, "--command", stop_script())], args.dry_run)
            return 0
        common.check_pod_workdir(args.workdir, "--workdir")
        run = Run(common.repo_relative_config(args.config, common.REPO), args.workdir, tuple(overrides))
        common.check_overrides(overrides)
        if not args.skip_setup:
            check_committed(common.REPO, [run.config])
        name = log_name(args.workdir)
        common.run_plan(plan(target, [run], name, common.REPO, setup=not args.skip_setup), args.dry_run)
    except common.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.dry_run:
        print(f"follow worker 0's log: {shlex.join(follow_command(target, name))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
