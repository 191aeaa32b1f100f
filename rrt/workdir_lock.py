"""One run per workdir: the primary process of a run holds <workdir>/run.lock.

On a local (or shared POSIX) filesystem the lock is an exclusive `flock` on that file. The kernel drops it when its
process dies, however it dies (SIGKILL included), so a killed run never leaves the workdir stuck; the file keeps the
holder's host, pid and start time only to name it in the refusal. On a filesystem without working `flock` (some
network mounts), the call fails loudly rather than pretending to lock.

On Cloud Storage (`gs://`) there is no flock, and nothing drops a lock when its holder dies. There the lock is an
object holding the holder, a random token and a heartbeat time, which a thread of the holder rewrites every
`heartbeat_s` seconds. A lock whose heartbeat is older than `expiry_s` belongs to a dead run and is taken over, so a
killed run blocks the workdir for at most `expiry_s` (5 minutes by default). epath has no conditional write, so two
runs starting at the same moment are told apart by writing, waiting `settle_s`, and reading back: Cloud Storage's
reads are strongly consistent, so of two writers closer together than the settle time both read the later one's
token and only its writer goes on; writers further apart see each other's live lock before writing. The expiry is
judged with the reader's clock against the writer's (NTP-synchronised hosts are far closer than `expiry_s`).

The lock is taken before anything in the workdir is read or written.
"""

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid

from etils import epath

from rrt import paths

LOCK_FILE = "run.lock"
EXPIRY_S = 300.0
HEARTBEAT_S = 60.0
SETTLE_S = 2.0


class WorkdirInUse(RuntimeError):
    """Another live run holds the workdir."""


def _holder() -> str:
    start = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()}, started {start}"


@dataclasses.dataclass
class Lock:
    """A held lock: keep it (and its process) alive for the run's lifetime; `release` when done."""

    path: str
    fd: int | None = None  # a local flock
    token: str | None = None  # an object lock: its token and heartbeat thread
    stop: threading.Event | None = None
    thread: threading.Thread | None = None


def acquire(workdir, expiry_s: float = EXPIRY_S, heartbeat_s: float = HEARTBEAT_S, settle_s: float = SETTLE_S) -> Lock:
    """Locks `workdir` for this process, or raises WorkdirInUse naming the holder. The expiry, heartbeat and settle
    times apply to object-store (gs://) workdirs only."""
    if paths.is_url(workdir):
        return _acquire_object(epath.Path(workdir) / LOCK_FILE, str(workdir), expiry_s, heartbeat_s, settle_s)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown holder"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise WorkdirInUse(
                f"{workdir} is in use by another run ({holder}); stop it first or use another --workdir"
            ) from None
        raise OSError(e.errno, f"cannot lock {path} ({e.strerror}): this filesystem does not support flock") from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_holder() + "\n").encode(), 0)
    return Lock(path, fd=fd)


def release(lock: Lock) -> None:
    if lock.fd is not None:
        fcntl.flock(lock.fd, fcntl.LOCK_UN)
        os.close(lock.fd)
        return
    lock.stop.set()
    lock.thread.join()
    path = epath.Path(lock.path)
    if (_read(path) or {}).get("token") == lock.token:
        path.unlink(missing_ok=True)


def _read(path: epath.Path) -> dict | None:
    """The lock object's record; None if there is none. An unreadable one counts as written at its mtime."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        float(record["heartbeat"])
        return record
    except (ValueError, KeyError, TypeError):
        return {"holder": "unknown holder (unreadable lock)", "token": None, "heartbeat": path.stat().mtime}


def _write(path: epath.Path, record: dict) -> None:
    paths.write_atomic(path, json.dumps(record) + "\n")


def _acquire_object(path: epath.Path, workdir: str, expiry_s, heartbeat_s, settle_s) -> Lock:
    held = _read(path)
    if held is not None:
        age = time.time() - float(held["heartbeat"])
        if age < expiry_s:
            raise WorkdirInUse(
                f"{workdir} is in use by another run ({held['holder']}; last heartbeat {age:.0f} s ago, a dead "
                f"run's lock expires after {expiry_s:.0f} s); stop it first or use another --workdir"
            )
        print(f"WARNING: taking over the expired lock of {held['holder']} ({age:.0f} s old)", flush=True)
    token = uuid.uuid4().hex
    record = {"holder": _holder(), "token": token, "heartbeat": time.time()}
    _write(path, record)
    time.sleep(settle_s)
    now = _read(path)
    if now is None or now.get("token") != token:
        winner = now["holder"] if now else "a run that has released it since"
        raise WorkdirInUse(f"{workdir} was locked at the same moment by another run ({winner}); use another --workdir")
    stop = threading.Event()
    thread = threading.Thread(target=_heartbeat, args=(path, record, stop, heartbeat_s), daemon=True)
    thread.start()
    return Lock(str(path), token=token, stop=stop, thread=thread)


def _heartbeat(path: epath.Path, record: dict, stop: threading.Event, every: float) -> None:
    """Rewrites the heartbeat while the lock is still ours; a failed write is retried at the next beat."""
    while not stop.wait(every):
        try:
            now = _read(path)
            if now is None or now.get("token") != record["token"]:
                print(f"WARNING: {path} was taken over by {now and now['holder']}; no longer heartbeating", flush=True)
                return
            _write(path, {**record, "heartbeat": time.time()})
        except Exception as e:  # noqa: BLE001 -- a transient storage error must not kill the run; named, retried
            print(f"WARNING: heartbeat of {path} failed ({type(e).__name__}: {e}); retrying", file=sys.stderr)
