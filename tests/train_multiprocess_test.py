"""Two processes on this machine (4 fake CPU devices each, gloo collectives) train like one process.

Each process reads its own slice of the document stream, so the reference is a single-process run fed the same
two host slices (tests/simulate_hosts.py); on one device, so the comparison also crosses device counts. The two
processes share the workdir: process 0 writes metrics.jsonl, both write their checkpoint shards.
"""

import os
import signal

import pytest
import trainrun

pytestmark = pytest.mark.slow
SIMULATE_2_HOSTS = (os.path.join(trainrun.REPO, "tests", "simulate_hosts.py"), "2")


def start_pair(workdir, *overrides, steps: int):
    port = trainrun.free_port()
    return [
        trainrun.start(
            workdir,
            "--config.mesh=1,8,1",
            f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
            *overrides,
            devices=4,
            steps=steps,
            log=f"{workdir}.process{i}.log",
        )
        for i in range(2)
    ]


def finish_pair(procs, workdir) -> None:
    try:
        codes = [trainrun.finish(p, timeout=1800) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for i, rc in enumerate(codes):
        assert rc == 0, f"process {i} exited with {rc}:\n{trainrun.tail(f'{workdir}.process{i}.log')}"


def test_two_processes_match_one(tmp_path):
    single = tmp_path / "single"
    trainrun.run(single, "--config.mesh=1,1,1", steps=4, module=SIMULATE_2_HOSTS)

    multi = tmp_path / "multi"
    finish_pair(start_pair(multi, steps=4), multi)
    trainrun.assert_same_losses(trainrun.metrics(multi), trainrun.metrics(single))
    # Both processes wrote their shards of the same checkpoint, sharded over all 8 devices.
    step = trainrun.checkpoint_steps(multi)[-1]
    assert step == 4
    names = os.listdir(multi / "checkpoints" / str(step) / "params")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(names), names
    assert trainrun.saved_specs(multi, step)["layers.q"] == [None, "fsdp", None]

    # Rerunning the same two commands with more steps resumes both processes (each from its own data position).
    finish_pair(start_pair(multi, steps=6), multi)
    assert "resumed from step 4" in trainrun.tail(f"{multi}.process0.log", 100_000)
    trainrun.run(single, "--config.mesh=1,1,1", steps=6, module=SIMULATE_2_HOSTS)
    trainrun.assert_same_losses(trainrun.metrics(multi), trainrun.metrics(single))


def test_sigterm_to_one_process_makes_both_save_the_same_step(tmp_path):
    """Preemption reaches hosts at different moments: SIGTERM to process 1 only. JAX's preemption sync makes both
    processes save the same step and exit 0; rerunning the pair resumes and equals an uninterrupted run."""
    import re

    steps, args = 12, ("--config.checkpoint_every=100", "--config.optim.schedule=constant")
    multi = tmp_path / "multi"
    procs = start_pair(multi, *args, steps=steps)

    def logged() -> int:
        path = multi / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    assert trainrun.wait_for(lambda: logged() >= 3 or any(p.poll() is not None for p in procs), 1200)
    procs[1].send_signal(signal.SIGTERM)
    finish_pair(procs, multi)
    saved = []
    for i in range(2):
        log = trainrun.tail(f"{multi}.process{i}.log")
        m = re.search(r"preempted \(SIGTERM\): checkpoint saved at step (\d+)", log)
        assert m, f"process {i} did not save on preemption:\n{log}"
        saved.append(int(m.group(1)))
    assert saved[0] == saved[1] < steps, saved
    assert trainrun.checkpoint_steps(multi)[-1] == saved[0]

    finish_pair(start_pair(multi, *args, steps=steps), multi)
    assert f"resumed from step {saved[0]}" in trainrun.tail(f"{multi}.process0.log", 100_000)
    single = tmp_path / "single"
    trainrun.run(single, "--config.mesh=1,1,1", *args, steps=steps, module=SIMULATE_2_HOSTS)
    trainrun.assert_same_losses(trainrun.metrics(multi), trainrun.metrics(single))
