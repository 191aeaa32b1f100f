"""The training log: metrics.jsonl (one JSON record per logged step) and TensorBoard events, on the primary host.

A rerun resumes from the newest checkpoint, so records a killed run wrote after that step are dropped first; so is
a partial last line (a process killed in the middle of a write), which would otherwise stop every later reader.
"""

import json
import os

import jax


def read_records(path: str, upto: int | None = None) -> list[dict]:
    """The complete records of a metrics.jsonl (those with step <= `upto`, if given). A partial (unparseable) LAST
    line is dropped; an unparseable line anywhere else is corruption, named with its line number."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if all(not rest.strip() for rest in lines[i + 1 :]):
                break  # the last line was cut by a kill mid-write
            raise ValueError(f"{path}:{i + 1}: not a JSON record ({e}); the log is corrupt") from e
        if upto is None or record["step"] <= upto:
            records.append(record)
    return records


class Logger:
    """metrics.jsonl + TensorBoard on the primary host."""

    def __init__(self, workdir: str, resume_step: int):
        self.primary = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        if self.primary:
            from tensorboardX import SummaryWriter

            if os.path.exists(self.path):  # drop records a killed run wrote after its last checkpoint
                keep = read_records(self.path, upto=resume_step)
                tmp = self.path + ".tmp"
                with open(tmp, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in keep)
                os.replace(tmp, self.path)
            self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.primary:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step":
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self):
        if self.primary:
            self.tb.close()
