"""Launchers: dry-run commands checked exactly, and the shell they generate run for real against fake tools.

No gcloud or Slurm is needed: the worker and batch scripts run in bash here, with fake `python`, `srun`, `scancel`,
`scontrol` and `sbatch` that record their arguments, so quoting is checked end to end rather than by eye.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launch import common, slurm, sweep, tpu_pod  # noqa: E402

LOCAL_SH = str(REPO / "launch" / "local.sh")
TRICKY = ["--config.eval.tasks=a b", '--config.source=it\'s "quoted" $HOME', "--config.steps", "7"]

# A fake interpreter: records its argv (and cwd) as JSON in <workdir>/argv.json, prints a line, optionally sleeps.
FAKE_PYTHON = f"#!{sys.executable}\n" + textwrap.dedent(
    """\
    import json, os, sys, time
    workdir = sys.argv[sys.argv.index("--workdir") + 1]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "argv.tmp"), "w") as f:
        json.dump({"argv": sys.argv[1:], "cwd": os.getcwd()}, f)
    os.replace(os.path.join(workdir, "argv.tmp"), os.path.join(workdir, "argv.json"))  # readers never see half
    print("fake training in", workdir, flush=True)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
    """
)


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def git_repo(tmp_path, monkeypatch):
    """A committed repository with a config and requirements.txt, used as the launchers' REPO and cwd."""
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "configs" / "x.py").write_text("def get_config(): ...\n")
    (repo / "requirements.txt").write_text("flax==0.12.8\njax==0.10.2\njaxlib==0.10.2\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    for argv in (["init", "-q"], ["add", "."], ["commit", "-qm", "init"]):
        subprocess.run(["git", "-C", str(repo), *argv], check=True, env=env)
    monkeypatch.setattr(common, "REPO", repo)
    monkeypatch.chdir(repo)
    return repo


# --- sweep helpers and expansion -------------------------------------------------------------------------------------


def test_grid_is_the_cartesian_product_last_axis_fastest():
    points = sweep.grid(**{"optim.lr": [1, 2, 3]}, recursion__loops=[2, 3])
    assert len(points) == 6
    assert points[:2] == [{"optim.lr": 1, "recursion.loops": 2}, {"optim.lr": 1, "recursion.loops": 3}]


def test_zip_pairs_and_rejects_unequal_lengths():
    assert sweep.zip_(a=[1, 2], b=["x", "y"]) == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    with pytest.raises(ValueError, match=r"equal length.*'a': 2, 'b': 3"):
        sweep.zip_(a=[1, 2], b=[1, 2, 3])


def test_product_merges_and_rejects_shared_keys():
    points = sweep.product(sweep.grid(a=[1, 2]), sweep.zip_(b=[3, 4], c=[5, 6]), [{"d": 0}])
    assert len(points) == 4 and points[1] == {"a": 1, "b": 4, "c": 6, "d": 0}
    with pytest.raises(ValueError, match=r"\['a'\] set by more than one"):
        sweep.product(sweep.grid(a=[1]), sweep.grid(a=[2]))


@pytest.mark.parametrize("axes, match", [({"lr": 0.1}, "list of values"), ({"lr": "abc"}, "list of values"),
                                         ({"lr": []}, "no values"), ({"a-b": [1]}, "dotted config path")])  # fmt: skip
def test_bad_axes_are_named(axes, match):
    with pytest.raises(ValueError, match=match):
        sweep.grid(**axes)


def test_run_names_are_stable_safe_and_unique():
    assert sweep.run_name({"optim.lr": 0.001, "recursion.loops": 2}) == "lr=0.001,loops=2"
    assert sweep.run_name({"a.x": 1, "b.x": 2}) == "a.x=1,b.x=2"  # shared last component: full keys
    assert sweep.run_name({"source": "/data/m 1", "flag": True}) == "source=-data-m-1,flag=True"
    assert sweep.run_name({}) == "base"
    long_a, long_b = (sweep.run_name({"tasks": "x" * 200 + c}) for c in "ab")
    assert len(long_a) == sweep.MAX_NAME and long_a != long_b
    assert long_a == sweep.run_name({"tasks": "x" * 200 + "a"})
    assert sweep.override_args({"optim.lr": 1e-3, "a": "b c", "m": (1, -1)}) == [
        "--config.optim.lr=0.001",
        "--config.a=b c",
        "--config.m=(1, -1)",
    ]


def test_expand_gives_each_point_a_workdir_and_rejects_duplicates():
    points = sweep.expand(sweep.grid(lr=[1, 2]), "gs://b/s1/")
    assert [(p.index, p.name, p.workdir) for p in points] == [
        (0, "lr=1", "gs://b/s1/lr=1"),
        (1, "lr=2", "gs://b/s1/lr=2"),
    ]
    with pytest.raises(ValueError, match="share the run name"):
        sweep.expand([{"lr": 1}, {"lr": 1}], "runs")
    with pytest.raises(ValueError, match="list of override dicts"):
        sweep.expand({"lr": 1}, "runs")


def test_example_sweep_expands_to_six_runs():
    points, config = sweep.load_sweep(str(REPO / "launch" / "sweeps" / "example.py"))
    assert config == "rrt/config.py" and len(sweep.expand(points, "runs/s")) == 6


# --- local -----------------------------------------------------------------------------------------------------------


def run_local_sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LOCAL_SH, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_local_dry_run_prints_the_training_command(git_repo):
    out = run_local_sh("--dry-run", "configs/x.py", "runs/a b", *TRICKY, env={"PYTHON": "py"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        shlex.join(["py", "-m", "rrt.train", "--config", "configs/x.py", "--workdir", "runs/a b", *TRICKY])
    ]


@pytest.mark.parametrize("args, message", [(["configs/nope.py", "w"], "unknown config file 'configs/nope.py'"),
                                           (["configs", "w"], "must be a preset name"),
                                           (["configs/x.py"], "usage:")])  # fmt: skip
def test_local_rejects_bad_input(git_repo, args, message):
    out = run_local_sh(*args)
    assert out.returncode == 2 and message in out.stderr


def test_a_preset_name_passes_through_every_launcher(git_repo, capsys):
    out = run_local_sh("--dry-run", "tiny", "runs/p", env={"PYTHON": "py"})  # local.sh knows its own checkout's presets
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["py", "-m", "rrt.train", "--config", "tiny", "--workdir", "runs/p"]
    assert common.config_for("x", git_repo) == "x" and common.repo_relative_config("x:arg", git_repo) == "x:arg"
    assert slurm.main([*SLURM_FLAGS, "--config", "x", "--workdir", "runs/g", "--dry-run"]) == 0
    assert "--config x " in capsys.readouterr().err
    with pytest.raises(common.LaunchError, match=r"preset name \(x\)"):
        common.check_config("y")


def test_local_runs_training_and_logs_to_the_workdir(git_repo, tmp_path):
    python = write_exe(tmp_path / "bin" / "python", FAKE_PYTHON)
    out = run_local_sh("configs/x.py", "runs/a b", *TRICKY, env={"PYTHON": str(python)})
    assert out.returncode == 0, out.stderr
    record = json.loads((git_repo / "runs" / "a b" / "argv.json").read_text())
    assert record["argv"] == ["-m", "rrt.train", "--config", "configs/x.py", "--workdir", "runs/a b", *TRICKY]
    wait_for(lambda: "fake training" in (git_repo / "runs" / "a b" / "train.log").read_text())
    assert run_local_sh("configs/x.py", "runs/f", env={"PYTHON": str(python), "FAKE_EXIT": "3"}).returncode == 3


# --- TPU pod ---------------------------------------------------------------------------------------------------------


def test_tpu_pod_dry_run_prints_the_plan(git_repo, capsys):
    rc = tpu_pod.main(["--tpu", "pod", "--zone", "us-west4-a", "--project", "p", "--config", "configs/x.py",
                       "--workdir", "/mnt/runs/g1", "--dry-run", "--", *TRICKY])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    tail = ["--zone=us-west4-a", "--worker=all", "--project=p"]
    tarball = str(git_repo / "build" / "rrt-code.tar.gz")
    lines = out.out.splitlines()
    assert lines[:3] == [
        shlex.join(["mkdir", "-p", str(git_repo / "build")]),
        shlex.join(["git", "-C", str(git_repo), "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]),
        shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "pod:/tmp/rrt-code.tar.gz", *tail]),
    ]
    setup, run = (shlex.split(line) for line in lines[3:])
    assert len(lines) == 5
    assert setup == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "pod",
        "--command",
        tpu_pod.setup_script("0.10.2"),
        *tail,
    ]
    run_spec = tpu_pod.Run("configs/x.py", "/mnt/runs/g1", tuple(TRICKY))
    assert run == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "pod",
        "--command",
        tpu_pod.run_script([run_spec], "g1"),
        *tail,
    ]
    assert "'jax[tpu]==0.10.2'" in setup[7] and "--torch-backend cpu" in setup[7]
    subprocess.run(["bash", "-n", "-c", setup[7]], check=True)  # valid shell


def test_tpu_pod_bad_input(git_repo, capsys):
    with pytest.raises(SystemExit):
        tpu_pod.main(["--zone", "z", "--config", "configs/x.py", "--workdir", "w", "--dry-run"])
    assert "--tpu" in capsys.readouterr().err
    for workdir in ("w", "~/runs/w", "runs/w"):  # would land in the workers' code directory
        assert tpu_pod.main(["--tpu", "t", "--zone", "z", "--workdir", workdir, "--config", "configs/x.py"]) == 2
        assert "--workdir must be a gs://bucket/dir URL or an absolute path" in capsys.readouterr().err
    for workdir in ("s3://b/r", "gs:///r", "file:///r"):  # rrt.train writes to gs:// URLs only
        assert tpu_pod.main(["--tpu", "t", "--zone", "z", "--workdir", workdir, "--config", "configs/x.py"]) == 2
        assert "the only URL rrt.train writes to is gs://bucket/dir" in capsys.readouterr().err
    base = ["--tpu", "t", "--zone", "z", "--workdir", "/w", "--dry-run", "--config"]
    assert tpu_pod.main([*base, "configs/none.py"]) == 2
    assert "unknown config file 'configs/none.py'" in capsys.readouterr().err
    (git_repo / "configs" / "new.py").write_text("")
    assert tpu_pod.main([*base, "configs/new.py"]) == 2
    assert "configs/new.py is untracked or modified" in capsys.readouterr().err
    assert tpu_pod.main([*base, "configs/x.py", "--", "configs/x.py"]) == 2
    assert "must look like --config.x=y" in capsys.readouterr().err
    (git_repo / "requirements.txt").write_text("numpy\n")
    with pytest.raises(common.LaunchError, match="pins no jax"):
        tpu_pod.jax_version(git_repo / "requirements.txt")


def test_tpu_pod_passes_a_gcs_workdir_to_the_workers_unchanged(git_repo, capsys):
    """gs://bucket/dir reaches the training command as it is (no local check, mkdir or abspath), and the setup
    installs the gs:// client (gcsfs) next to requirements.txt."""
    rc = tpu_pod.main(["--tpu", "pod", "--zone", "z", "--config", "configs/x.py", "--workdir", "gs://b/runs/g1",
                       "--dry-run"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    setup, run = (shlex.split(line)[7] for line in out.out.splitlines()[3:])
    assert run == tpu_pod.run_script([tpu_pod.Run("configs/x.py", "gs://b/runs/g1")], "g1")
    assert shlex.join(["--workdir", "gs://b/runs/g1"]) in run
    assert "uv pip install" in setup and " gcsfs" in setup
    assert setup.index("a run is still going") < setup.index("rm -rf")  # checked before the code is touched
    assert "rm -rf" in setup and setup.count("rm -rf") == 1 and 'rm -rf "$HOME/rrt/code"' in setup
    assert "rm " not in run and "gs://b" not in setup  # the run itself deletes nothing; setup never sees the bucket
    assert not Path("gs:").exists() and not (git_repo / "gs:").exists()


def test_sweep_on_a_tpu_pod_with_a_gcs_base_workdir(git_repo, capsys):
    """Each point's workdir is gs://.../<name>; the manifest goes to the bucket with gcloud storage cp."""
    argv = [write_sweep(git_repo), "--base_workdir", "gs://b/s1", "--launcher", "tpu_pod", "--dry-run"]
    assert sweep.main([*argv, "--", "--tpu", "t", "--zone", "z", "--skip_setup"]) == 0
    cp, ssh = capsys.readouterr().out.splitlines()
    assert shlex.split(cp) == ["gcloud", "storage", "cp", "-", "gs://b/s1/manifest.json"]
    script = shlex.split(ssh)[7]
    for name in ("lr=0.1,name=a-b", "lr=0.2,name=a-b"):
        assert shlex.join(["--workdir", f"gs://b/s1/{name}"]) in script
    assert "mkdir -p gs:" not in script and not (git_repo / "gs:").exists()


def test_tpu_setup_refuses_while_a_run_goes_and_replaces_only_the_code(tmp_path, monkeypatch):
    """The worker's setup script, run by bash with a fake uv: a live run stops it before anything is touched; else
    only ~/rrt/code is replaced (the venv, the logs and anything else in ~/rrt stay)."""
    home, src = tmp_path / "home", tmp_path / "src"
    (src / "requirements.txt").parent.mkdir()
    (src / "requirements.txt").write_text("numpy\n")
    tarball = tmp_path / "code.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(src), "."], check=True)
    monkeypatch.setattr(tpu_pod, "REMOTE_TARBALL", str(tarball))
    write_exe(tmp_path / "bin" / "uv", f'#!/bin/sh\necho "$@" >> {tmp_path}/uv.calls\n')
    write_exe(home / "rrt" / "venv" / "bin" / "python", FAKE_PYTHON)
    for keep in ("code/old_file", "runs/w/checkpoint", "notes.txt"):
        (home / "rrt" / keep).parent.mkdir(parents=True, exist_ok=True)
        (home / "rrt" / keep).write_text("x")
    env = {**os.environ, "HOME": str(home), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    script = tpu_pod.setup_script("0.10.2")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (home / "rrt_logs").mkdir()
        (home / "rrt_logs" / "train.pid").write_text(str(sleeper.pid))
        busy = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
        assert busy.returncode == 1 and "a run is still going" in busy.stderr
        assert (home / "rrt" / "code" / "old_file").exists() and not (tmp_path / "uv.calls").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (home / "rrt" / "code" / "old_file").exists() and (home / "rrt" / "code" / "requirements.txt").exists()
    assert (home / "rrt" / "runs" / "w" / "checkpoint").exists() and (home / "rrt" / "notes.txt").exists()
    assert "pip install --python ../venv/bin/python" in (tmp_path / "uv.calls").read_text()


def test_tpu_worker_scripts_run_detached_and_stop(tmp_path):
    """The worker command, run by bash here: detached runs in order, one at a time, logs per host, --stop."""
    home = tmp_path / "home"
    write_exe(home / "rrt" / "venv" / "bin" / "python", FAKE_PYTHON)
    (home / "rrt" / "code").mkdir()
    runs = [tpu_pod.Run("configs/x.py", str(tmp_path / f"w{i}"), tuple(TRICKY)) for i in range(2)]
    env = {**os.environ, "HOME": str(home)}
    started = subprocess.run(["bash", "-c", tpu_pod.run_script(runs, "s1")], env=env, capture_output=True, text=True)
    assert started.returncode == 0 and "started pid" in started.stdout, started.stderr
    wait_for(lambda: (tmp_path / "w1" / "argv.json").exists())
    for run in runs:
        record = json.loads((Path(run.workdir) / "argv.json").read_text())
        assert record == {"argv": ["-m", "rrt.train", "--config", "configs/x.py", "--workdir", run.workdir, *TRICKY],
                          "cwd": str(home / "rrt" / "code")}  # fmt: skip
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    wait_for(lambda: (home / "rrt_logs" / f"s1.{host}.log").read_text().count("fake training") == 2)
    alive = ["bash", "-c", tpu_pod.ALIVE]
    wait_for(lambda: subprocess.run(alive, env=env).returncode != 0)  # the chain has ended

    env["FAKE_SLEEP"] = "60"
    subprocess.run(["bash", "-c", tpu_pod.run_script(runs[:1], "s2")], env=env, check=True, capture_output=True)
    again = subprocess.run(["bash", "-c", tpu_pod.run_script(runs[:1], "s2")], env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "a run is still going" in again.stderr
    pid = int((home / "rrt_logs" / "train.pid").read_text())
    stopped = subprocess.run(["bash", "-c", tpu_pod.stop_script()], env=env, capture_output=True, text=True)
    assert "sent SIGTERM" in stopped.stdout
    wait_for(lambda: subprocess.run(alive, env=env).returncode != 0)
    assert pid > 0


# --- SLURM -----------------------------------------------------------------------------------------------------------

SLURM_FLAGS = ["--nodes", "4", "--gpus_per_node", "8", "--partition", "gpu", "--time", "24:00:00"]


def test_slurm_dry_run_renders_and_writes_nothing(git_repo, capsys):
    workdir = git_repo / "runs" / "g"
    rc = slurm.main([*SLURM_FLAGS, "--config", "configs/x.py", "--workdir", "runs/g", "--dry-run",
                     "--sbatch_arg=--account=abc", "--setup", "module load cuda", "--", *TRICKY])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0 and out.out.splitlines() == [f"sbatch {workdir}/slurm.sbatch"]
    assert not workdir.exists()
    script = out.err
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue",
                 "#SBATCH --partition=gpu", "#SBATCH --time=24:00:00", "#SBATCH --signal=B:USR1@120",
                 f"#SBATCH --output={workdir}/slurm-%j.out", "#SBATCH --job-name=rrt-g", "#SBATCH --account=abc",
                 f"cd {git_repo} || exit 1", "module load cuda"]:  # fmt: skip
        assert line in script.splitlines(), line
    python = str(git_repo / ".venv" / "bin" / "python")
    srun = shlex.join(common.train_argv(python, "configs/x.py", str(workdir), TRICKY))
    assert f"srun --kill-on-bad-exit=1 {srun} &" in script


def test_slurm_writes_then_submits(git_repo, tmp_path, monkeypatch, capsys):
    write_exe(tmp_path / "bin" / "sbatch", '#!/bin/sh\necho "$@" > "$(dirname "$0")/sbatch.args"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    args = [*SLURM_FLAGS, "--config", "configs/x.py", "--workdir", "runs/g"]
    assert slurm.main(args) == 0  # no --submit: write and print only
    assert (git_repo / "runs" / "g" / "slurm.sbatch").exists() and not (tmp_path / "bin" / "sbatch.args").exists()
    assert slurm.main([*args, "--submit"]) == 0
    assert (tmp_path / "bin" / "sbatch.args").read_text().split() == [str(git_repo / "runs" / "g" / "slurm.sbatch")]


@pytest.mark.parametrize("change, message", [(["--time", "24h"], "--time must be"), (["--nodes", "0"], ">= 1"),
                                             (["--workdir", "gs://b/r"], "shared filesystem"),
                                             (["--partition", "a b"], "whitespace"),
                                             (["--config", "nope.py"], "unknown config file")])  # fmt: skip
def test_slurm_bad_input(git_repo, capsys, change, message):
    assert slurm.main([*SLURM_FLAGS, "--config", "configs/x.py", "--workdir", "w", "--dry-run", *change]) == 2
    assert message in capsys.readouterr().err


def fake_cluster(tmp_path: Path) -> tuple[dict, Path]:
    """Fake srun (runs the command), scancel (signals the fake tasks), scontrol (records); and the job's env."""
    bin_dir, rec = tmp_path / "bin", tmp_path / "calls"
    write_exe(bin_dir / "srun", f'#!/bin/bash\necho "srun $*" >> {rec}\nshift\nexec "$@"\n')
    write_exe(
        bin_dir / "scancel", f'#!/bin/bash\necho "scancel $*" >> {rec}\nkill -TERM "$(cat {tmp_path}/task.pid)"\n'
    )
    write_exe(bin_dir / "scontrol", f'#!/bin/bash\necho "scontrol $*" >> {rec}\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n1"}
    return env, rec


def test_slurm_script_runs_training_and_requeues_near_the_time_limit(tmp_path):
    env, rec = fake_cluster(tmp_path)
    on_term = "trap 'kill $!; echo checkpointed; exit 0' TERM"
    task = write_exe(
        tmp_path / "fake_task", f"#!/bin/bash\necho $$ > {tmp_path}/task.pid\n{on_term}\nsleep 30 & wait\n"
    )
    ok = write_exe(tmp_path / "ok", FAKE_PYTHON)
    common_fields = dict(
        job_name="j", nodes=1, gpus_per_node=1, partition="p", time="1:00:00", log="l", repo=str(tmp_path)
    )
    script = tmp_path / "job.sbatch"

    script.write_text(slurm.render(train_argv=[str(ok), "--workdir", str(tmp_path / "w"), *TRICKY], **common_fields))
    done = subprocess.run(["bash", str(script)], env={**env, "FAKE_EXIT": "5"}, capture_output=True, text=True)
    assert done.returncode == 5, done.stderr  # training's exit status is the job's
    assert json.loads((tmp_path / "w" / "argv.json").read_text())["argv"] == ["--workdir", str(tmp_path / "w"), *TRICKY]

    rec.unlink()
    script.write_text(slurm.render(train_argv=[str(task)], **common_fields))
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "task.pid").exists())
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does (inside `wait` or not, the trap handles it)
    out, _ = job.communicate(timeout=10)
    assert job.returncode == 0 and "checkpointed" in out
    assert rec.read_text().splitlines()[1:] == ["scancel --signal=TERM 42", "scontrol requeue 42"]


# --- sweeps through each launcher ------------------------------------------------------------------------------------


def write_sweep(repo: Path) -> str:
    (repo / "s.py").write_text(
        "from launch import sweep\nCONFIG = 'configs/x.py'\n"
        "def get_sweep():\n    return sweep.product(sweep.grid(optim__lr=[0.1, 0.2]), [{'name': 'a b'}])\n"
    )
    return "s.py"


def test_sweep_local_dry_run_and_errors(git_repo, capsys):
    assert sweep.main([write_sweep(git_repo), "--base_workdir", "runs/s", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        shlex.join(
            [LOCAL_SH, "configs/x.py", f"runs/s/lr={lr},name=a-b", f"--config.optim.lr={lr}", "--config.name=a b"]
        )
        for lr in (0.1, 0.2)
    ]
    assert not (git_repo / "runs").exists()
    (git_repo / "bad.py").write_text("from launch import sweep\ndef get_sweep():\n    return sweep.zip_(a=[1], b=[])\n")
    assert sweep.main(["bad.py", "--base_workdir", "r", "--config", "configs/x.py"]) == 2
    assert "no values" in capsys.readouterr().err
    assert sweep.main(["missing.py", "--base_workdir", "r"]) == 2
    assert "unknown sweep file" in capsys.readouterr().err
    assert sweep.main(["s.py", "--base_workdir", "r", "--config", "configs/none.py"]) == 2
    with pytest.raises(SystemExit):
        sweep.main(["s.py", "--base_workdir", "r", "--launcher", "slurm", "--max_parallel", "2"])


def test_sweep_local_runs_every_point_and_writes_the_manifest(git_repo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHON", str(write_exe(tmp_path / "python", FAKE_PYTHON)))
    assert sweep.main([write_sweep(git_repo), "--base_workdir", "runs/s", "--max_parallel", "2"]) == 0
    manifest = json.loads((git_repo / "runs" / "s" / "manifest.json").read_text())
    assert manifest["config"] == "configs/x.py" and manifest["launcher"] == "local"
    assert [p["index"] for p in manifest["points"]] == [0, 1]
    point = manifest["points"][1]
    assert point["overrides"] == {"optim.lr": 0.2, "name": "a b"} and point["workdir"] == "runs/s/lr=0.2,name=a-b"
    assert point["command"] == shlex.join([LOCAL_SH, "configs/x.py", point["workdir"], "--config.optim.lr=0.2",
                                           "--config.name=a b"])  # fmt: skip
    record = json.loads((git_repo / point["workdir"] / "argv.json").read_text())
    assert record["argv"][-4:] == ["--workdir", point["workdir"], "--config.optim.lr=0.2", "--config.name=a b"]


def test_sweep_on_a_tpu_pod_chains_the_points_in_one_detached_job(git_repo, tmp_path, capsys):
    """The dry-run's one command, whose worker script, run here, writes the manifest and runs every point."""
    base = str(tmp_path / "s1")
    argv = [write_sweep(git_repo), "--base_workdir", base, "--launcher", "tpu_pod", "--dry-run"]
    assert sweep.main([*argv, "--", "--tpu", "t", "--zone", "z", "--skip_setup"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    gcloud = shlex.split(line)
    assert gcloud[:7] + gcloud[8:] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t", "--command", "--zone=z",
                                       "--worker=all"]  # fmt: skip
    assert not Path(base).exists()
    home = tmp_path / "home"
    write_exe(home / "rrt" / "venv" / "bin" / "python", FAKE_PYTHON)
    (home / "rrt" / "code").mkdir()
    subprocess.run(["bash", "-c", gcloud[7]], env={**os.environ, "HOME": str(home)}, check=True, capture_output=True)
    wait_for(lambda: Path(base, "lr=0.2,name=a-b", "argv.json").exists())
    points = json.loads(Path(base, "manifest.json").read_text())["points"]
    assert [p["workdir"] for p in points] == [f"{base}/lr=0.1,name=a-b", f"{base}/lr=0.2,name=a-b"]
    assert shlex.split(points[1]["command"]) == ["python", "launch/tpu_pod.py", "--tpu", "t", "--zone", "z",
                                                 "--skip_setup", "--config", "configs/x.py", "--workdir",
                                                 points[1]["workdir"], "--", "--config.optim.lr=0.2",
                                                 "--config.name=a b"]  # fmt: skip
    for p in points:
        record = json.loads(Path(p["workdir"], "argv.json").read_text())["argv"]
        assert record[-4:] == ["--workdir", p["workdir"], *sweep.override_args(p["overrides"])]
    with pytest.raises(SystemExit):  # the slice flags are required
        sweep.main(argv)
    rel = [write_sweep(git_repo), "--base_workdir", "runs/s", "--launcher", "tpu_pod", "--dry-run"]
    assert sweep.main([*rel, "--", "--tpu", "t", "--zone", "z"]) == 2
    assert "--base_workdir must be a gs://bucket/dir URL or an absolute path" in capsys.readouterr().err


def test_sweep_on_slurm_writes_a_script_per_point(git_repo, capsys):
    argv = [write_sweep(git_repo), "--base_workdir", "runs/s", "--launcher", "slurm", "--", *SLURM_FLAGS]
    assert sweep.main(argv) == 0
    workdirs = [git_repo / "runs" / "s" / f"lr={lr},name=a-b" for lr in (0.1, 0.2)]
    assert capsys.readouterr().out.splitlines() == [f"sbatch {w}/slurm.sbatch" for w in workdirs]
    assert all((w / "slurm.sbatch").exists() for w in workdirs)
    point = json.loads((git_repo / "runs" / "s" / "manifest.json").read_text())["points"][0]
    assert shlex.split(point["command"]) == ["python", "launch/slurm.py", *SLURM_FLAGS, "--config", "configs/x.py",
                                             "--workdir", "runs/s/lr=0.1,name=a-b", "--", "--config.optim.lr=0.1",
                                             "--config.name=a b"]  # fmt: skip
