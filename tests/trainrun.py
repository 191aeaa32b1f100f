"""Helpers for tests that run `python -m rrt.train` as a subprocess (fake CPU devices, several processes, kills).

Every run shares one persistent XLA compilation cache (RRT_TEST_COMPILE_CACHE, default under the temp dir), so a
rerun of the same command (resume tests) or a second test with the same shapes does not compile again.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("RRT_TEST_COMPILE_CACHE", os.path.join(tempfile.gettempdir(), "rrt_test_compile_cache"))

# The tiny config, shrunk further: T=32, no evaluation, a record every step, a short warmup.
SMALL = (
    "--config.data.seq_len=32",
    "--config.eval.heldout=",
    "--config.log_every=1",
    "--config.optim.warmup_steps=2",
)


def env(devices: int = 1) -> dict:
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    e["JAX_COMPILATION_CACHE_DIR"] = CACHE
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def command(workdir: str, *overrides: str, steps: int = 5, module: tuple[str, ...] = ("-m", "rrt.train")) -> list:
    return [
        sys.executable,
        *module,
        "--config",
        os.path.join(REPO, "configs", "tiny.py"),
        "--workdir",
        str(workdir),
        f"--config.steps={steps}",
        *SMALL,
        *overrides,
    ]


def start(workdir, *overrides, devices: int = 1, steps: int = 5, log: str | None = None, module=("-m", "rrt.train")):
    """A training process (stdout+stderr appended to `log`, default <workdir>.log)."""
    log = log or f"{workdir}.log"
    f = open(log, "a")
    return subprocess.Popen(
        command(workdir, *overrides, steps=steps, module=module),
        cwd=REPO,
        env=env(devices),
        stdout=f,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 1800) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def run(workdir, *overrides, devices: int = 1, steps: int = 5, timeout: float = 1800, check=True, module=None):
    """Runs training to completion; raises with the log's tail if it fails (and `check`)."""
    log = f"{workdir}.log"
    proc = start(workdir, *overrides, devices=devices, steps=steps, log=log, module=module or ("-m", "rrt.train"))
    rc = finish(proc, timeout)
    if check and rc != 0:
        raise AssertionError(f"training exited with {rc}; log {log}:\n{tail(log)}")
    return rc


def tail(path: str, n: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def metrics(workdir) -> dict[int, dict]:
    """{step: record} of metrics.jsonl's training records (the final evaluation's record has no loss)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                if r["step"] in out:
                    raise AssertionError(f"{workdir}/metrics.jsonl holds step {r['step']} twice")
                out[r["step"]] = r
    return out


TRAINED = ("loss", "loss/loop1", "loss/loop2", "grad_norm")


def assert_same_losses(got: dict, want: dict, rtol: float = 1e-5, keys=TRAINED) -> None:
    assert sorted(got) == sorted(want), f"steps differ: {sorted(got)} vs {sorted(want)}"
    for step in sorted(want):
        for k in keys:
            a, b = got[step][k], want[step][k]
            assert abs(a - b) <= rtol * abs(b), f"step {step} {k}: {a} vs {b} (rel {abs(a - b) / abs(b):.2e})"


def checkpoint_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def saved_specs(workdir, step: int, item: str = "params") -> dict[str, list]:
    """{array name: partition spec} as Orbax recorded the saved arrays' shardings."""
    import base64

    with open(os.path.join(workdir, "checkpoints", str(step), item, "_sharding")) as f:
        raw = json.load(f)
    return {base64.b64decode(k).decode(): json.loads(v)["partition_spec"] for k, v in raw.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False
