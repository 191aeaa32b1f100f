"""A run directory on Cloud Storage (`--workdir gs://bucket/run`), on a fake bucket (tests/fake_gcs.py: every
gs:// path is a local directory; appending is refused, as on GCS).

Covered on the fake bucket: rrt.paths, metrics.jsonl (rewrite-on-flush, resume truncation, a partial last line),
TensorBoard event files, the object lock (refusal, release, expiry of a SIGKILLed holder's lock, heartbeat), the
token cache (upload, then download instead of tokenizing), and a whole training run interrupted by SIGTERM and
rerun, which must equal an uninterrupted local run, with checkpoints, metrics, config, metadata, tokenizer, events
and token cache in the bucket. Not covered: tensorstore's own gcs driver (the fake maps Orbax's gs:// kvstore to
tensorstore's file driver), gcsfs or TensorFlow's gfile (the fake replaces epath's gs:// backend), and real
object-store latency or consistency.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import fake_gcs
import numpy as np
import pytest
import trainrun

from rrt import metrics_log, paths, workdir_lock
from rrt.data import tokens

BUCKET = "gs://fake-bucket"


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    root = tmp_path / "gcs"
    monkeypatch.setenv(fake_gcs.ENV, str(root))
    monkeypatch.setenv("RRT_LOCAL_CACHE", str(tmp_path / "local_cache"))
    with fake_gcs.patched(str(root)) as fake:
        yield fake


def test_workdir_path_keeps_gs_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.workdir_path("gs://b/run")) == "gs://b/run"
    assert str(paths.workdir_path("runs/a")) == str(tmp_path / "runs" / "a")
    assert str(paths.workdir_path("~/r")) == os.path.expanduser("~/r")
    with pytest.raises(ValueError, match="unsupported URL scheme s3://"):
        paths.workdir_path("s3://b/run")
    with pytest.raises(ValueError, match="names no bucket"):
        paths.workdir_path("gs:///run")


def test_metrics_on_gcs_are_rewritten_whole_and_truncated_on_resume(gcs):
    wd = f"{BUCKET}/run"
    local = gcs.local(wd)
    logger = metrics_log.Logger(wd, resume_step=0)
    for s in range(1, 6):
        logger.write(s, {"loss": 10.0 - s})
    logger.close()
    with open(os.path.join(local, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5]
    with pytest.raises(NotImplementedError, match="appended"):  # the fake behaves as GCS: no append
        (paths.workdir_path(wd) / "metrics.jsonl").open("a")

    time.sleep(1.1)  # tensorboardX names event files by the second (a training start takes longer than that)
    logger = metrics_log.Logger(wd, resume_step=3)  # a rerun restored step 3: 4 and 5 are dropped
    logger.write(4, {"loss": 1.5})
    logger.close()
    records = metrics_log.read_records(f"{wd}/metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 1.5)]

    with open(os.path.join(local, "metrics.jsonl"), "a") as f:  # a partial last line (a copied-in local log)
        f.write('{"step": 5, "lo')
    logger = metrics_log.Logger(wd, resume_step=4)
    logger.write(5, {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in metrics_log.read_records(f"{wd}/metrics.jsonl")] == [1, 2, 3, 4, 5]

    events = sorted(os.listdir(os.path.join(local, "tb")))
    assert len(events) >= 2 and all(n.startswith("events.out.tfevents.") for n in events), events  # one per start
    assert all(os.path.getsize(os.path.join(local, "tb", n)) > 0 for n in events)


def test_tensorboard_events_on_gcs_hold_the_scalars(gcs):
    from tensorboardX.proto import event_pb2

    wd = f"{BUCKET}/tb"
    logger = metrics_log.Logger(wd, resume_step=0)
    logger.write(1, {"loss": 2.5})
    logger.write(2, {"loss": 1.25})
    logger.close()
    (name,) = os.listdir(os.path.join(gcs.local(wd), "tb"))
    data = open(os.path.join(gcs.local(wd), "tb", name), "rb").read()
    seen, i = [], 0
    while i < len(data):  # TFRecord framing: length (8), its crc (4), the event, its crc (4)
        n = int.from_bytes(data[i : i + 8], "little")
        event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
        seen += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        i += 16 + n
    assert seen == [(1, "loss", 2.5), (2, "loss", 1.25)]


HOLD = (
    "import sys; sys.path.insert(0, 'tests'); import os, fake_gcs, time; fake_gcs.install(os.environ['RRT_FAKE_GCS']); "
    "from rrt import workdir_lock; workdir_lock.acquire(sys.argv[1], heartbeat_s=0.2, settle_s=0.1); "
    "print('held', flush=True); time.sleep(600)"
)


def test_object_lock_refuses_a_live_holder_and_expires_a_killed_one(gcs):
    wd = f"{BUCKET}/locked"
    lock_file = os.path.join(gcs.local(wd), workdir_lock.LOCK_FILE)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, wd], stdout=subprocess.PIPE, text=True, cwd=trainrun.REPO,
                            env=trainrun.env())  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        first = json.load(open(lock_file))["heartbeat"]
        assert trainrun.wait_for(lambda: json.load(open(lock_file))["heartbeat"] > first, 10), "no heartbeat"
        with pytest.raises(workdir_lock.WorkdirInUse, match=rf"in use by another run \(pid {proc.pid} on "):
            workdir_lock.acquire(wd, expiry_s=5, settle_s=0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with pytest.raises(workdir_lock.WorkdirInUse):  # killed: its lock stays until it expires
        workdir_lock.acquire(wd, expiry_s=5, settle_s=0.1)
    time.sleep(1.5)
    lock = workdir_lock.acquire(wd, expiry_s=1, settle_s=0.1)  # expired: taken over, nothing stuck for good
    assert f"pid {os.getpid()} " in json.load(open(lock_file))["holder"]
    workdir_lock.release(lock)
    assert not os.path.exists(lock_file)
    workdir_lock.release(workdir_lock.acquire(wd, settle_s=0.1))  # released: free at once


def test_a_lock_overwritten_during_the_settle_time_is_lost(gcs, monkeypatch):
    wd = f"{BUCKET}/race"
    real_sleep = time.sleep

    def other_run_writes(seconds):  # another run's lock object lands while this one settles
        record = {"holder": "pid 1 on other", "token": "x", "heartbeat": time.time()}
        paths.write_atomic(paths.workdir_path(wd) / workdir_lock.LOCK_FILE, json.dumps(record))
        real_sleep(seconds)

    monkeypatch.setattr(workdir_lock.time, "sleep", other_run_writes)
    with pytest.raises(workdir_lock.WorkdirInUse, match=r"at the same moment by another run \(pid 1 on other\)"):
        workdir_lock.acquire(wd, settle_s=0.01)


class _Tok:
    bos_id, eos_id, add_bos, add_eos, vocab_size = 1, 2, True, True, 300

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return [3 + ord(c) % 200 for c in text]


def test_token_cache_on_gcs_is_uploaded_then_downloaded_not_rebuilt(gcs, tmp_path, monkeypatch):
    docs = ["hello", "a longer document", "x"]
    tok = _Tok()
    cache = f"{BUCKET}/run/token_cache"
    built = tokens.cached_tokens(docs, tokens.Encoder(tok, None, None), cache, "k")
    assert tok.calls == 3
    assert sorted(os.listdir(gcs.local(cache))) == ["k.offsets.npy", "k.tokens.npy"]
    monkeypatch.setenv("RRT_LOCAL_CACHE", str(tmp_path / "another_host"))
    other = _Tok()
    got = tokens.cached_tokens(docs, tokens.Encoder(other, None, None), cache, "k")
    assert other.calls == 0 and got.path.startswith(str(tmp_path / "another_host"))
    assert [list(got[i]) for i in range(3)] == [list(built[i]) for i in range(3)]
    np.testing.assert_array_equal(got.lengths(), [len(d) + 2 for d in docs])


def test_evaluate_generate_and_export_read_an_rrt_dir_in_a_bucket_as_its_local_copy(gcs, tmp_path):
    """rrt.evaluate, rrt.generate and rrt.export given `--source gs://...` (an rrt model dir uploaded to the bucket)
    give what they give for the same directory on a local disk."""
    import shutil

    import export_test

    from rrt import evaluate, export, formats, generate

    local = export_test.relaxed_recursive(export_test.llama(), export_test.small_tokenizer(add_bos=True), tmp_path)
    url = f"{BUCKET}/models/relaxed"
    shutil.copytree(local, gcs.local(url))

    cfg_l, params_l = formats.load(local)
    cfg_g, params_g = formats.load(url)
    assert cfg_g == cfg_l and params_g.keys() == params_l.keys()
    assert all(np.array_equal(params_g[k], params_l[k]) for k in params_l)
    assert formats.load_tokenizer(url).encode(export_test.TEXT) == formats.load_tokenizer(local).encode(
        export_test.TEXT
    )
    assert formats.max_positions(url) == formats.max_positions(local)

    text = tmp_path / "text.txt"
    text.write_text((export_test.TEXT + "\n") * 20)
    results = {}
    for name, source in (("local", local), ("gcs", url)):
        out = tmp_path / f"{name}.json"
        args = ["--source", source, "--task", "perplexity", "--data", str(text), "--seq_len", "16", "--no_progress"]
        assert evaluate.main([*args, "--output", str(out)]) == 0
        results[name] = json.loads(out.read_text())["perplexity"]
    assert results["gcs"]["ppl"] == results["local"]["ppl"] and results["gcs"]["tokens"] == results["local"]["tokens"]

    outs = {}
    for name, source in (("local", local), ("gcs", url)):
        assert generate.main(["--source", source, "--prompt", "Once upon", "--max_new_tokens", "5"]) == 0
        assert export.main(["--source", source, "--out", str(tmp_path / f"hf_{name}")]) == 0
        outs[name] = sorted(os.listdir(tmp_path / f"hf_{name}"))
    assert outs["gcs"] == outs["local"]
    for f in outs["local"]:
        assert (tmp_path / "hf_gcs" / f).read_bytes() == (tmp_path / "hf_local" / f).read_bytes(), f

    with pytest.raises(ValueError, match="a URL source must be an rrt model directory"):
        formats.load(f"{BUCKET}/not-a-model")


@pytest.mark.slow
def test_training_in_a_gcs_workdir_interrupted_and_rerun_equals_an_uninterrupted_local_run(gcs, tmp_path):
    steps = 8
    args = ("--config.checkpoint_every=3", "--config.keep_checkpoints=100")
    reference = tmp_path / "reference"
    trainrun.run(reference, *args, steps=steps)

    wd = f"{BUCKET}/run"
    local = gcs.local(wd)
    log = str(tmp_path / "gcs_run.log")
    script = (os.path.join(trainrun.REPO, "tests", "fake_gcs.py"),)

    def logged() -> int:
        try:
            return len(metrics_log.read_records(f"{wd}/metrics.jsonl"))
        except FileNotFoundError:
            return 0

    proc = trainrun.start(wd, *args, steps=steps, log=log, module=script)
    assert trainrun.wait_for(lambda: logged() >= 4 or proc.poll() is not None, 900)
    proc.send_signal(signal.SIGTERM)
    assert trainrun.finish(proc) == 0, trainrun.tail(log)
    m = re.search(r"preempted \(SIGTERM\): checkpoint saved at step (\d+)", trainrun.tail(log, 50_000))
    assert m, trainrun.tail(log)
    stopped = int(m.group(1))
    assert 4 <= stopped < steps
    assert not os.path.exists(os.path.join(local, workdir_lock.LOCK_FILE)), "the lock is released at exit"

    assert trainrun.finish(trainrun.start(wd, *args, steps=steps, log=log, module=script)) == 0, trainrun.tail(log)
    assert f"resumed from step {stopped} of {wd}" in trainrun.tail(log, 100_000)
    trainrun.assert_same_losses(trainrun.metrics(local), trainrun.metrics(reference), rtol=1e-6)

    names = set(os.listdir(local))
    assert names >= {"checkpoints", "metrics.jsonl", "train_config.json", "rrt_model.json", "tokenizer", "tb",
                     "token_cache"}, names  # fmt: skip
    assert os.listdir(os.path.join(local, "token_cache")), "the token cache was uploaded"
    assert len(os.listdir(os.path.join(local, "tb"))) == 2, "one event file per start"
    committed = sorted(
        int(n) for n in os.listdir(os.path.join(local, "checkpoints"))
        if os.path.exists(os.path.join(local, "checkpoints", n, "commit_success.txt"))
    )  # fmt: skip
    assert stopped in committed and steps in committed and 3 in committed, committed  # Orbax's GCS commit files

    # The checkpoints restore through gs:// (Orbax + epath on the fake bucket) to the uninterrupted run's params.
    from train_resume_test import assert_same_params, restore_every_step

    got = restore_every_step(wd, on_disk=local)
    want = restore_every_step(reference)
    assert_same_params(got[steps], want[steps], rtol=1e-6)

    # What rrt.evaluate, rrt.generate and rrt.export read for `--source gs://...`: the newest step and the tokenizer.
    from rrt import formats

    (cfg_g, params_g), (cfg_l, params_l) = formats.load(wd), formats.load(str(reference))
    assert cfg_g == cfg_l
    for k in params_l:
        np.testing.assert_allclose(params_g[k], params_l[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert formats.load_tokenizer(wd).encode("Once upon a time") == formats.load_tokenizer(str(reference)).encode(
        "Once upon a time"
    )


@pytest.mark.slow
def test_training_in_a_gcs_workdir_sigkilled_mid_save_and_rerun_equals_an_uninterrupted_local_run(gcs, tmp_path):
    """SIGKILL while a step is being saved (its directory in the bucket, not yet committed): the killed run's lock
    stays (a rerun at once is refused), and once it is gone (as after its expiry, tested above) the rerun ignores
    the uncommitted step and finishes the same run."""
    steps = 8
    args = ("--config.async_checkpoint=true", "--config.checkpoint_every=1", "--config.keep_checkpoints=100")
    reference = tmp_path / "reference"
    trainrun.run(reference, *args, steps=steps)

    wd = f"{BUCKET}/killed"
    local = gcs.local(wd)
    ckpts = os.path.join(local, "checkpoints")
    log = str(tmp_path / "killed.log")
    script = (os.path.join(trainrun.REPO, "tests", "fake_gcs.py"),)

    def saving() -> bool:  # a step directory without Orbax's commit file: a save in flight
        names = os.listdir(ckpts) if os.path.isdir(ckpts) else []
        return any(n.isdigit() and n != "1" and not os.path.exists(os.path.join(ckpts, n, "commit_success.txt"))
                   for n in names)  # fmt: skip

    proc = trainrun.start(wd, *args, steps=steps, log=log, module=script)
    assert trainrun.wait_for(lambda: saving() or proc.poll() is not None, 900, interval=0.01), trainrun.tail(log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, trainrun.tail(log)

    out = subprocess.run(trainrun.command(wd, *args, steps=steps, module=script), cwd=trainrun.REPO,
                         env=trainrun.env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode != 0 and "is in use by another run" in out.stderr, out.stderr[-3000:]
    os.remove(os.path.join(local, workdir_lock.LOCK_FILE))  # what its expiry does, 5 minutes later

    assert trainrun.finish(trainrun.start(wd, *args, steps=steps, log=log, module=script)) == 0, trainrun.tail(log)
    assert re.search(r"resumed from step \d+ of gs://fake-bucket/killed", trainrun.tail(log, 100_000))
    trainrun.assert_same_losses(trainrun.metrics(local), trainrun.metrics(reference), rtol=1e-6)
