"""One run per workdir: the primary process of a run holds an exclusive `flock` on <workdir>/run.lock.

The kernel drops the lock when its process dies, however it dies (SIGKILL included), so a killed run never leaves
the workdir stuck; the file keeps the holder's host, pid and start time only to name it in the refusal. The lock is
taken before anything in the workdir is read or written. On a filesystem without working `flock` (some network
mounts), the call fails loudly rather than pretending to lock.
"""

import datetime
import errno
import fcntl
import os
import socket

LOCK_FILE = "run.lock"


class WorkdirInUse(RuntimeError):
    """Another live run holds the workdir."""


def acquire(workdir: str) -> int:
    """Locks `workdir` for this process (the returned fd holds it: keep it open for the run's lifetime)."""
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
    start = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {start}\n".encode(), 0)
    return fd


def release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
