"""What every launcher shares: the training command, path checks, and printing or running a plan of commands.

A launcher turns its flags into a *plan*: a list of argv lists, run one after another. `--dry-run` prints the plan,
one shell-quoted command per line on stdout, and runs nothing; anything else a launcher wants to say goes to stderr,
so the dry-run output is exactly what would run.
"""

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN_MODULE = "rrt.train"


class LaunchError(Exception):
    """Bad launcher input; the message names the flag or file."""


def is_remote(path: str) -> bool:
    """True for URLs such as gs://bucket/dir, which no local check or mkdir can reach."""
    return "://" in path


def check_pod_workdir(workdir: str, flag: str) -> None:
    """A workdir every host of a pod reaches as the same place: a `gs://bucket/dir` URL (passed to the workers as it
    is; rrt.train writes it through etils.epath) or an absolute path on a filesystem every worker shares; never
    relative or `~` (those resolve inside each worker's code directory, which the next launch replaces)."""
    if is_remote(workdir):
        scheme, _, rest = workdir.partition("://")
        if scheme != "gs" or not rest.split("/", 1)[0]:
            raise LaunchError(f"{flag} {workdir!r}: the only URL rrt.train writes to is gs://bucket/dir")
        return
    if workdir.startswith("~") or not workdir.startswith("/"):
        raise LaunchError(
            f"{flag} must be a gs://bucket/dir URL or an absolute path on a filesystem every worker shares, got "
            f"{workdir!r} (a relative or ~ path would land in the workers' code directory, which each launch replaces)"
        )


def config_file(config: str) -> str:
    """The file part of an ml_collections config argument (`configs/x.py:arg` -> `configs/x.py`)."""
    return config.split(":", 1)[0]


def is_preset(config: str) -> bool:
    """True for a bare preset name (`tiny`, `recursive_gemma_1b:arg`) shipped in this checkout's configs/."""
    name = config_file(config)
    return os.sep not in name and not name.endswith(".py") and (REPO / "configs" / f"{name}.py").is_file()


def check_config(config: str) -> None:
    """Fail early on a config that is neither a preset name nor an existing file (relative to the current directory)."""
    if is_preset(config):
        return
    path = config_file(config)
    if not path.endswith(".py"):
        presets = sorted(p.stem for p in (REPO / "configs").glob("*.py") if not p.stem.startswith("_"))
        raise LaunchError(
            f"--config must be a preset name ({', '.join(presets)}) or a Python config file, got {config!r}"
        )
    if not os.path.isfile(path):
        raise LaunchError(f"unknown config file {path!r} (relative to {os.getcwd()})")


def config_for(config: str, repo: Path) -> str:
    """`config` for a command that runs from `repo`: a preset name as it is; a file relative to `repo` when inside
    it, else absolute (keeps `:arg`)."""
    check_config(config)
    if is_preset(config):
        return config
    path, sep, arg = config.partition(":")
    rel = os.path.relpath(os.path.abspath(path), repo)
    inside = rel != ".." and not rel.startswith(".." + os.sep)
    return (rel if inside else os.path.abspath(path)) + sep + arg


def repo_relative_config(config: str, repo: Path) -> str:
    """`config` as a path inside `repo`, for jobs that get only the repository's files."""
    rel = config_for(config, repo)
    if os.path.isabs(rel):
        raise LaunchError(f"config {config!r} is outside the repository {repo}: the code shipped to the job lacks it")
    return rel


def train_argv(python: str, config: str, workdir: str, overrides: Sequence[str] = ()) -> list[str]:
    """The one training command every launcher runs (rerunning it resumes the run in `workdir`)."""
    return [python, "-m", TRAIN_MODULE, "--config", config, "--workdir", workdir, *overrides]


def check_overrides(overrides: Sequence[str]) -> list[str]:
    """Training flags passed through after `--`: each is `--flag[=value]`, or the value after a `--flag`."""
    overrides = list(overrides)
    for i, arg in enumerate(overrides):
        if not arg.startswith("--") and (i == 0 or "=" in overrides[i - 1] or not overrides[i - 1].startswith("--")):
            raise LaunchError(f"training overrides must look like --config.x=y, got {arg!r} in {shlex.join(overrides)}")
    return overrides


def safe_name(text: str) -> str:
    """`text` with every character outside [A-Za-z0-9._=,+-] replaced by '-' (file and job names)."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "-", text).strip("-.") or "run"


def run_plan(plan: Sequence[Sequence[str]], dry_run: bool) -> None:
    """Print each command (shell-quoted, one per line); unless `dry_run`, run it and stop at the first failure."""
    for argv in plan:
        print(shlex.join(argv), flush=True)
        if dry_run:
            continue
        rc = subprocess.run(list(argv)).returncode
        if rc:
            raise LaunchError(f"command failed with exit status {rc}: {shlex.join(argv)}")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
