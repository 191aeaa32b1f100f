"""The training log: metrics.jsonl (one JSON record per logged step) and TensorBoard events, on the primary host.

A rerun resumes from the newest checkpoint, so records a killed run wrote after that step are dropped first; so is
a partial last line (a process killed in the middle of a write), which would otherwise stop every later reader.

On a local disk records are appended. On Cloud Storage (a gs:// workdir) objects cannot be appended to, so the
Logger keeps the file's records in memory and rewrites the whole metrics.jsonl at every write: one object upload is
all or nothing, so a kill leaves the previous complete version (never a partial line), and a resume reads it back,
keeps the records up to the restored step and goes on rewriting. The cost is the file's size per logged step (about
300 bytes a record: 10,000 records are 3 MB). TensorBoard goes through tensorboardX, whose gs:// event writer is
replaced here by one over epath (`_EpathEventFile`) with the same design: the event file, kept in memory, is uploaded
whole at each flush. Each start writes a new event file, so a resume never overwrites an earlier one.
"""

import io
import json
import threading

import jax
from etils import epath

from rrt import paths


def read_records(path, upto: int | None = None) -> list[dict]:
    """The complete records of a metrics.jsonl (those with step <= `upto`, if given). A partial (unparseable) LAST
    line is dropped; an unparseable line anywhere else is corruption, named with its line number."""
    lines = epath.Path(path).read_text(encoding="utf-8").split("\n")
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


class _EpathEventFile:
    """A TensorBoard event file on an object store: written to memory, uploaded whole (via epath) at each flush."""

    def __init__(self, path: str):
        self.path = epath.Path(path)
        self.buffer = io.BytesIO()
        self.lock = threading.Lock()  # tensorboardX writes from its thread, flushes from the caller's too
        self.flushed = 0

    def write(self, data: bytes) -> None:
        with self.lock:
            self.buffer.write(data)

    def flush(self) -> None:
        with self.lock:  # uploads in order: a slower, older upload must not land after a newer one
            data = self.buffer.getvalue()
            if len(data) != self.flushed:
                paths.write_atomic(self.path, data)
                self.flushed = len(data)

    def close(self) -> None:
        self.flush()


class _EpathEventFiles:
    """tensorboardX's writer factory for gs:// (its own needs google-cloud-storage and bypasses epath)."""

    def open(self, path):
        return _EpathEventFile(path)

    def directory_check(self, path):
        del path  # an object store has no directories to create


def _tensorboard(logdir: epath.Path):
    from tensorboardX import SummaryWriter, record_writer

    if paths.is_url(logdir):
        record_writer.register_writer_factory(str(logdir).split("://")[0], _EpathEventFiles())
    return SummaryWriter(str(logdir))


class Logger:
    """metrics.jsonl + TensorBoard on the primary host."""

    def __init__(self, workdir, resume_step: int):
        self.primary = jax.process_index() == 0
        self.path = paths.workdir_path(workdir) / "metrics.jsonl"
        self.rewrite = paths.is_url(self.path)  # no append on an object store: keep the records, rewrite them
        self.records: list[str] = []
        if self.primary:
            if self.path.exists():  # drop records a killed run wrote after its last checkpoint
                self.records = [json.dumps(r) + "\n" for r in read_records(self.path, upto=resume_step)]
                paths.write_atomic(self.path, "".join(self.records))
                if not self.rewrite:  # appended to from here on: nothing to keep in memory
                    self.records = []
            self.tb = _tensorboard(self.path.parent / "tb")

    def write(self, step: int, metrics: dict) -> None:
        if not self.primary:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self.rewrite:
            self.records.append(line)
            paths.write_atomic(self.path, "".join(self.records))
        else:
            with self.path.open("a") as f:
                f.write(line)
        for k, v in record.items():
            if k != "step":
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self):
        if self.primary:
            self.tb.close()
