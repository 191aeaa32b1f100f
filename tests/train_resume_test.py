"""Rerunning the same command resumes the same run: after SIGKILL anywhere (also mid-save), after SIGTERM, on
another mesh; and a diverging run stops naming the step, its last good checkpoint restorable.

"The same run" is checked strictly: metrics.jsonl of the interrupted run (truncated to the restored step by
train.Logger, so every step appears once) equals an uninterrupted run's, and every checkpoint left behind restores
completely (params, optimizer state, metadata, data-iterator state) with finite values.
"""

import json
import os
import random
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest
import trainrun
from etils import epath
from flax import nnx

from rrt import model as model_lib
from rrt import optim, sharding
from rrt import train_state as ckpt_lib
from rrt.formats import rrt_dir


def restore_every_step(workdir, on_disk=None) -> dict[int, dict]:
    """{step: params} for every checkpoint in the workdir (a path or a gs:// URL whose files are in the local
    directory `on_disk`), each restored completely on this process's 1 device."""
    cfg = model_lib.ModelConfig.from_dict(rrt_dir.read_meta(str(workdir))["model"])
    c = json.loads(epath.Path(str(workdir), "train_config.json").read_text())
    params = nnx.to_pure_dict(nnx.split(model_lib.abstract(cfg))[1])
    opt, _ = optim.make(optim.OptimConfig(**c["optim"], total_steps=c["steps"]), params)
    abstract_opt = jax.eval_shape(opt.init, params)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    param_sh = sharding.param_shardings(params, mesh)
    opt_sh = sharding.opt_state_shardings(opt, abstract_opt, param_sh, mesh)
    with_sh = lambda t, s: jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t, s)  # noqa: E731
    mngr = ckpt_lib.manager(str(workdir), 1, None, async_save=False)
    out = {}
    try:
        steps = list(mngr.all_steps())
        assert sorted(steps) == trainrun.checkpoint_steps(on_disk or workdir), "the manager and the directory disagree"
        for step in steps:
            p, o, meta, data = ckpt_lib.restore(mngr, step, with_sh(params, param_sh), with_sh(abstract_opt, opt_sh))
            assert meta["step"] == step and data["fingerprint"], (step, meta)
            for leaf in jax.tree.leaves((p, o)):
                assert np.all(np.isfinite(np.asarray(leaf))), f"step {step}: non-finite values"
            out[step] = jax.tree.map(np.asarray, p)
    finally:
        mngr.close()
    return out


def assert_same_params(a: dict, b: dict, rtol=1e-5) -> None:
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr = 1e30: the first real update (step 2) blows the weights up, step 3's gradients are NaN (its loss is
    still finite: RMSNorm maps inf to 0). The run stops there with an error naming step 3 and checkpoint 2."""
    workdir = tmp_path / "nan"
    rc = trainrun.run(
        workdir, "--config.optim.lr=1e30", "--config.checkpoint_every=1", "--config.async_checkpoint=true", check=False
    )
    log = trainrun.tail(f"{workdir}.log", 20_000)
    assert rc != 0, log
    assert re.search(r"FloatingPointError: non-finite loss \S+ or gradient norm \S+ at step 3;", log), log[-3000:]
    assert "last good checkpoint (step 2)" in log, log[-3000:]
    assert sorted(trainrun.metrics(workdir)) == [1, 2]
    restored = restore_every_step(workdir)
    assert sorted(restored) == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# Interruptions. The uninterrupted reference runs first: it also fills the compilation cache, so reruns start fast.

SAVE_EVERY_STEP = ("--config.async_checkpoint=true", "--config.checkpoint_every=1", "--config.keep_checkpoints=100")


def saving_now(workdir) -> bool:
    d = os.path.join(workdir, "checkpoints")
    return os.path.isdir(d) and any("tmp" in n for n in os.listdir(d))


def logged_steps(workdir) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return sum(1 for line in f if '"loss"' in line)
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_equals_uninterrupted(tmp_path):
    steps = 10
    reference = tmp_path / "reference"
    trainrun.run(reference, *SAVE_EVERY_STEP, steps=steps)

    workdir = tmp_path / "killed"
    rng = random.Random(0)
    # Where each attempt is killed: during a checkpoint save (a temporary step directory exists), at a random moment
    # after a step, at a random moment of startup (restore, compilation); then the run is left to finish.
    plan = ["save", "step", "startup", "save", "step", "save"]
    kills = []
    for when in [*plan, None]:
        proc = trainrun.start(workdir, *SAVE_EVERY_STEP, steps=steps)
        if when is None:
            assert trainrun.finish(proc) == 0, trainrun.tail(f"{workdir}.log")
            break
        before = logged_steps(workdir)
        if when == "save":
            hit = trainrun.wait_for(lambda p=proc: saving_now(workdir) or p.poll() is not None, 900, interval=0.02)
        elif when == "step":
            hit = trainrun.wait_for(lambda p=proc, n=before: logged_steps(workdir) > n or p.poll() is not None, 900)
            time.sleep(rng.uniform(0, 2))
        else:
            time.sleep(rng.uniform(1, 15))
            hit = True
        in_save = saving_now(workdir)
        if proc.poll() is not None:  # finished (or failed) before the kill
            assert proc.returncode == 0, trainrun.tail(f"{workdir}.log")
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append((when, hit, in_save, logged_steps(workdir), trainrun.checkpoint_steps(workdir)[-1:]))
    print("kills (when, reached, mid-save, logged steps, newest checkpoint):", kills)
    assert len(kills) >= 4, kills
    assert any(k[2] for k in kills), f"no kill landed during a save: {kills}"

    trainrun.assert_same_losses(trainrun.metrics(workdir), trainrun.metrics(reference), rtol=1e-6)
    restored, want = restore_every_step(workdir), restore_every_step(reference)
    assert max(restored) == steps
    assert_same_params(restored[steps], want[steps], rtol=1e-6)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_rerun_resumes(tmp_path):
    steps = 8
    args = ("--config.checkpoint_every=100",)  # only the first step, SIGTERM and the end save
    reference = tmp_path / "reference"
    trainrun.run(reference, *args, steps=steps)

    workdir = tmp_path / "preempted"
    proc = trainrun.start(workdir, *args, steps=steps)
    assert trainrun.wait_for(lambda: logged_steps(workdir) >= 2 or proc.poll() is not None, 900)
    proc.send_signal(signal.SIGTERM)
    assert trainrun.finish(proc) == 0, trainrun.tail(f"{workdir}.log")
    log = trainrun.tail(f"{workdir}.log", 50_000)
    m = re.search(r"preempted \(SIGTERM\): checkpoint saved at step (\d+)", log)
    assert m, log[-3000:]
    stopped = int(m.group(1))
    assert 2 <= stopped < steps
    assert trainrun.checkpoint_steps(workdir)[-1] == stopped == max(trainrun.metrics(workdir))

    trainrun.run(workdir, *args, steps=steps)
    assert f"resumed from step {stopped} of" in trainrun.tail(f"{workdir}.log", 100_000)
    trainrun.assert_same_losses(trainrun.metrics(workdir), trainrun.metrics(reference), rtol=1e-6)
    assert_same_params(restore_every_step(workdir)[steps], restore_every_step(reference)[steps], rtol=1e-6)


@pytest.mark.slow
def test_checkpoint_from_8_devices_resumes_on_1_device_and_on_2x2(tmp_path):
    """3 steps on (1, 8, 1); the same workdir rerun for 6 steps on 1 device, and on a (2, 2, 1) mesh of 4 devices,
    equals 6 uninterrupted steps. (A constant schedule, so that the lengthened run has the same learning rates.)"""
    args = ("--config.optim.schedule=constant",)
    reference = tmp_path / "reference"
    trainrun.run(reference, *args, "--config.mesh=1,1,1", devices=1, steps=6)
    eight = tmp_path / "eight"
    trainrun.run(eight, *args, "--config.mesh=1,8,1", devices=8, steps=3)
    assert trainrun.saved_specs(eight, 3)["layers.q"] == [None, "fsdp", None]
    for name, mesh, devices, spec in (
        ("one", "1,1,1", 1, [None, None, None]),
        ("two", "2,2,1", 4, [None, "fsdp", None]),
    ):
        workdir = tmp_path / name
        shutil.copytree(eight, workdir)
        trainrun.run(workdir, *args, f"--config.mesh={mesh}", devices=devices, steps=6)
        assert "resumed from step 3 of" in trainrun.tail(f"{workdir}.log", 100_000)
        trainrun.assert_same_losses(trainrun.metrics(workdir), trainrun.metrics(reference))
        assert trainrun.saved_specs(workdir, 6)["layers.q"] == spec


# ---------------------------------------------------------------------------------------------------------------
# Damage after the save: the newest step does not restore.


def _damage(step_dir: str, how: str) -> str:
    """Truncates the largest file under the step's params/ to half, or removes its opt_state item; returns what."""
    if how == "missing_item":
        shutil.rmtree(os.path.join(step_dir, "opt_state"))
        return "opt_state"
    files = [os.path.join(d, n) for d, _, ns in os.walk(os.path.join(step_dir, "params")) for n in ns]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    return os.path.relpath(biggest, step_dir)


@pytest.mark.parametrize("how", [pytest.param("truncated_params", marks=pytest.mark.slow), "missing_item"])
def test_damaged_latest_checkpoint_is_named_kept_and_the_run_resumes_from_the_previous(tmp_path, how):
    workdir = tmp_path / how
    args = ("--config.checkpoint_every=1", "--config.keep_checkpoints=100", "--config.async_checkpoint=false")
    trainrun.run(workdir, *args, steps=3)
    assert trainrun.checkpoint_steps(workdir) == [1, 2, 3]
    damaged = _damage(os.path.join(workdir, "checkpoints", "3"), how)

    trainrun.run(workdir, *args, steps=4)
    log = trainrun.tail(f"{workdir}.log", 100_000)
    assert "WARNING: checkpoint step 3 does not restore (" in log, log[-3000:]
    assert "resumed from step 2 of" in log, log[-3000:]
    aside = os.path.join(workdir, "checkpoints_unrestorable")
    (kept,) = os.listdir(aside)  # the damaged step, moved as it was
    assert kept.startswith("3.")
    if how == "missing_item":
        assert not os.path.exists(os.path.join(aside, kept, damaged))
        assert os.path.isdir(os.path.join(aside, kept, "params"))
    else:
        assert os.path.isfile(os.path.join(aside, kept, damaged))
    assert trainrun.checkpoint_steps(workdir) == [1, 2, 3, 4]
    assert sorted(restore_every_step(workdir)) == [1, 2, 3, 4]
    assert sorted(trainrun.metrics(workdir)) == [1, 2, 3, 4]
    # train_config.json is what the rerun (which wrote step 4) used; the first attempt's is kept beside it
    with open(os.path.join(workdir, "train_config.json")) as f:
        assert json.load(f)["steps"] == 4
    (earlier,) = [n for n in os.listdir(workdir) if n.startswith("train_config.") and n != "train_config.json"]
    with open(os.path.join(workdir, earlier)) as f:
        assert json.load(f)["steps"] == 3


# default run under 20 min on CI; a damaged newest step is checked by test_damaged_latest_checkpoint_...
@pytest.mark.slow
def test_when_no_checkpoint_restores_the_run_stops_moving_nothing(tmp_path):
    workdir = tmp_path / "none"
    args = ("--config.checkpoint_every=1", "--config.keep_checkpoints=100", "--config.async_checkpoint=false")
    trainrun.run(workdir, *args, steps=2)
    damaged = {s: _damage(os.path.join(workdir, "checkpoints", str(s)), "truncated_params") for s in (1, 2)}
    size = {s: os.path.getsize(os.path.join(workdir, "checkpoints", str(s), f)) for s, f in damaged.items()}
    records = trainrun.metrics(workdir)
    assert trainrun.run(workdir, *args, steps=3, check=False) != 0
    log = trainrun.tail(f"{workdir}.log", 100_000)
    assert "RuntimeError: no checkpoint in" in log, log[-3000:]
    assert "checkpoint step 2 does not restore (" in log and "checkpoint step 1 does not restore (" in log
    assert trainrun.checkpoint_steps(workdir) == [1, 2]  # left where they were, as they were
    for s, f in damaged.items():
        assert os.path.getsize(os.path.join(workdir, "checkpoints", str(s), f)) == size[s]
    assert not os.path.exists(os.path.join(workdir, "checkpoints_unrestorable"))
    assert trainrun.metrics(workdir) == records  # the log is not truncated to a fresh start
