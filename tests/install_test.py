"""rrt as a user gets it: a wheel installed (not editable) into a fresh virtualenv, run from a directory outside the
repository: every console script's --help, one tiny training step from a preset, and one from a user's own config
file that starts from a preset and holds only its deltas.

The fresh venv gets no dependencies of its own (nothing is downloaded): a .pth file puts the test interpreter's
site-packages on its path *after* the wheel is installed. A path listed in a .pth file is added to sys.path but its
own .pth files are not processed, so the development checkout's editable finder (`__editable__*rrt*`) stays inert;
the test checks that `rrt` is imported from the fresh venv all the same.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import needs
import pytest
import trainrun

REPO = trainrun.REPO
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")


def _scripts() -> list[str]:
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return sorted(tomllib.load(f)["project"]["scripts"])


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, environment for running its scripts, a working directory outside the repository)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"  # a copy of the sources: the build's build/ and *.egg-info stay out of the checkout
    os.makedirs(src)
    for name in ("rrt", "configs"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    pip = [sys.executable, "-m", "pip"]
    wheels = root / "wheels"
    p = _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)], root, None)
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = os.listdir(wheels)
    venv = root / "venv"
    p = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root, None)
    assert p.returncode == 0, p.stderr[-3000:]
    python = venv / "bin" / "python"
    p = _run([*pip, "--python", str(python), "install", "-q", "--no-deps", str(wheels / wheel)], root, None)
    assert p.returncode == 0, p.stderr[-3000:]
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, None)
    deps = [d for d in site.getsitepackages() if os.path.isdir(d)]
    with open(os.path.join(purelib.stdout.strip(), "_rrt_test_deps.pth"), "w") as f:
        f.write("".join(d + "\n" for d in deps))
    cwd = root / "elsewhere"
    os.makedirs(cwd)
    env = {k: v for k, v in trainrun.env(1).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["RRT_SHARED_DATA"] = os.environ.get("RRT_SHARED_DATA", SHARED)
    env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")
    env["HF_DATASETS_OFFLINE"] = env["HF_HUB_OFFLINE"] = "1"
    where = _run([str(python), "-c", "import rrt; print(rrt.__file__)"], cwd, env)
    assert where.returncode == 0, where.stderr[-3000:]
    assert where.stdout.strip().startswith(str(venv)), f"rrt imported from {where.stdout.strip()}, not the venv"
    return venv / "bin", env, cwd


def test_console_scripts_help(installed):
    bin_dir, env, cwd = installed
    scripts = _scripts()
    assert {"rrt-train", "rrt-convert", "rrt-evaluate", "rrt-generate", "rrt-lm-eval"} <= set(scripts)
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(scripts, pool.map(lambda s: _run([str(bin_dir / s), "--help"], cwd, env, 300), scripts)))
    for script, p in procs.items():
        assert p.returncode == 0, f"{script} --help exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        assert "usage" in p.stdout.lower() or "--" in p.stdout, f"{script} --help printed no usage:\n{p.stdout}"
    assert "--workdir" in procs["rrt-train"].stdout
    assert "--source" in procs["rrt-convert"].stdout
    assert "lm-eval" in procs["rrt-lm-eval"].stdout  # the harness's own CLI


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_from_preset_and_from_a_user_config(installed, tmp_path):
    """`rrt-train --config tiny` (a preset name, found in the installed rrt.presets) and `--config my.py` (a file in
    a directory of the user's, starting from `config.preset("tiny")`): one step each, from outside the repo."""
    bin_dir, env, cwd = installed
    if not os.path.isdir(env["RRT_SHARED_DATA"]):
        needs.missing(f"the shared data {env['RRT_SHARED_DATA']} is missing")
    small = [a for a in trainrun.SMALL if not a.startswith("--config.optim.warmup_steps")]
    train = str(bin_dir / "rrt-train")
    mine = tmp_path / "my_configs"
    os.makedirs(mine)
    (mine / "my_run.py").write_text(
        textwrap.dedent("""\
            from rrt import config


            def get_config():
                c = config.preset("tiny")
                c.steps = 1
                c.optim.warmup_steps = 0
                c.data.seq_len = 32
                c.eval.heldout = ""
                c.log_every = 1
                return c
            """)
    )
    wd, wd2 = tmp_path / "preset_run", tmp_path / "user_run"
    runs = [
        [train, "--config", "tiny", "--workdir", str(wd), "--config.steps=1", "--config.optim.warmup_steps=0", *small],
        [train, "--config", str(mine / "my_run.py"), "--workdir", str(wd2)],
    ]
    with ThreadPoolExecutor(2) as pool:  # the two runs overlap their start-up (imports, tokenizer, corpus)
        procs = list(pool.map(lambda cmd: _run(cmd, cwd, env), runs))
    for cmd, p in zip(runs, procs):
        assert p.returncode == 0, f"{cmd}:\n{p.stderr[-4000:]}"
    (rec,) = [r for r in _records(wd) if "loss" in r]
    assert rec["step"] == 1 and 0 < rec["loss"] < 20
    with open(wd / "train_config.json") as f:
        recorded = json.load(f)
    assert recorded["data"]["sources"][0]["glob"].startswith(env["RRT_SHARED_DATA"])

    (rec2,) = [r for r in _records(wd2) if "loss" in r]
    # same preset, same deltas, same seeds: the same first step as the command-line overrides gave
    assert rec2["loss"] == pytest.approx(rec["loss"], rel=1e-5)
    with open(wd2 / "train_config.json") as f:
        assert json.load(f)["data"]["seq_len"] == 32
