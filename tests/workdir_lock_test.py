"""One run per workdir: a second run is refused naming the holder; a SIGKILLed holder leaves nothing stuck."""

import os
import signal
import subprocess
import sys
import time

import pytest
import trainrun

from rrt import workdir_lock

HOLD = (
    "import sys, time; from rrt import workdir_lock; workdir_lock.acquire(sys.argv[1]); "
    "print('held', flush=True); time.sleep(600)"
)


def hold(workdir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True,
                            env=trainrun.env())  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_and_a_killed_holder_frees_the_workdir(tmp_path):
    proc = hold(tmp_path)
    try:
        with pytest.raises(workdir_lock.WorkdirInUse, match=rf"in use by another run \(pid {proc.pid} on "):
            workdir_lock.acquire(str(tmp_path))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    fd = workdir_lock.acquire(str(tmp_path))  # nothing stuck
    assert f"pid {os.getpid()}" in (tmp_path / workdir_lock.LOCK_FILE).read_text()
    workdir_lock.release(fd)


def test_training_refuses_a_workdir_in_use(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    proc = hold(workdir)
    try:
        t0 = time.time()
        out = subprocess.run(trainrun.command(workdir, steps=1), cwd=trainrun.REPO, env=trainrun.env(),
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert out.returncode != 0 and f"is in use by another run (pid {proc.pid}" in out.stderr, out.stderr[-2000:]
    assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_FILE], "nothing else was written"
    assert time.time() - t0 < 300
