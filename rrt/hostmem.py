"""Host memory: the entry points re-execute themselves once so that glibc's malloc uses transparent huge pages.

On the CPU every XLA executable allocates its temporaries afresh on each call (activations, gradients, the logits),
gigabytes per training step. glibc serves such blocks with mmap and returns them with munmap, so every step faults
its memory in again, 4 KiB at a time: about 950,000 page faults and 2.7 s of kernel time per SmolLM2-shaped step on
2 cores (docs/TRAINING.md, "Where the time goes"). With the glibc tunable `glibc.malloc.hugetlb=1` malloc asks for
transparent huge pages (madvise), the faults fall to a few thousand and the step is 25% shorter; peak RSS is
unchanged. Tunables are read when a process starts, so `reexec_with_hugepages` (called by the command-line entry
points, never on import) replaces the process with itself, same argv, with the tunable added to GLIBC_TUNABLES. It
does nothing where it cannot help: not Linux with glibc, transparent huge pages set to `never`, the tunable already
set, or RRT_HUGEPAGES=0. On GPUs and TPUs it only touches host memory; device memory has its own allocator.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def with_tunable(env: dict[str, str]) -> dict[str, str]:
    """`env` with TUNABLE appended to its GLIBC_TUNABLES (kept as is where hugetlb is already set either way)."""
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return dict(env)
    return {**env, "GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE}


def without_tunable(env: dict[str, str]) -> dict[str, str]:
    """`env` as it was before `reexec_with_hugepages` added TUNABLE (for a baseline that should not get it)."""
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t != TUNABLE]
    out = {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}
    if kept:
        out["GLIBC_TUNABLES"] = ":".join(kept)
    return out


def applies() -> bool:
    """Whether re-executing would change anything here: supported, not switched off, not set already."""
    if os.environ.get("RRT_HUGEPAGES", "1") == "0" or "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return supported()


def supported() -> bool:
    """Linux with glibc, and transparent huge pages not set to `never`."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open(_THP) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def reexec_with_hugepages() -> None:
    """Replace this process with itself (sys.orig_argv) under TUNABLE, once; returns only where it does not apply."""
    if not applies():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, with_tunable(dict(os.environ)))
