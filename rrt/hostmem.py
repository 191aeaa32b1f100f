"""Host memory: the entry points re-execute themselves once so that glibc's malloc keeps the step's memory mapped
(on transparent huge pages) from one step to the next.

On the CPU every XLA executable allocates its temporaries afresh on each call (activations, gradients, the logits),
gigabytes per training step. glibc serves blocks above 32 MiB with mmap and returns them with munmap, so every step
faults its memory in again: about 950,000 page faults and 2.7 s of kernel time per SmolLM2-shaped step on 2 cores
at 4 KiB pages (docs/TRAINING.md, "Where the time goes"). `TUNABLE` sets, in GLIBC_TUNABLES:
  glibc.malloc.hugetlb=1           malloc asks for transparent huge pages (madvise): a few thousand faults a step,
                                   but each still zeroes 2 MiB afresh (1.3-1.8 s of kernel time a step);
  glibc.malloc.mmap_max=0          no block is served by mmap: all come from the heap,
  glibc.malloc.arena_max=1         one heap (a thread's own arena cannot hold a block above 64 MiB),
  glibc.malloc.trim_threshold=64G  freed memory stays in the heap for the next step (no munmap, no new faults),
  glibc.malloc.top_pad=1G          the heap grows in 1 GiB steps (it reached its peak in one step, not three).
With all five the steady state has no page faults and 0.1 s of kernel time a step (hugetlb alone: 3,000-5,000
faults, 1.3-2.6 s), and the vanilla SmolLM2 step at 4 x 256 on 2 cores is 6.6-7.1 -> 5.9-6.2 s in float32 and
6.9-7.2 -> 5.3-5.8 s in bfloat16 (runs alternated, 2026-12-08); peak RSS 5.82-5.84 -> 5.88 GiB in float32, unchanged
in bf16. The price: compiling takes about a third longer (one arena serializes the XLA compiler's threads too:
the step's compile 3.9 -> 5.2-5.5 s; with 2 or 4 arenas the faults come back, 2,000-3,300 a step), and the process
keeps its peak heap mapped while it runs (malloc_trim still returns it). A training run compiles once and steps
thousands of times; RRT_HUGEPAGES=0 turns it all off.

Tunables are read when a process starts, so `reexec_with_hugepages` (called by the command-line entry points, never
on import) replaces the process with itself, same argv, with TUNABLE added to GLIBC_TUNABLES. It does nothing where
it cannot help: not Linux with glibc, transparent huge pages set to `never`, the user's own hugetlb tunable already
set, or RRT_HUGEPAGES=0. On GPUs and TPUs it only touches host memory; device memory has its own allocator.
"""

import os
import platform
import sys

TUNABLE = ":".join(
    (
        "glibc.malloc.hugetlb=1",
        "glibc.malloc.mmap_max=0",
        "glibc.malloc.arena_max=1",
        f"glibc.malloc.trim_threshold={64 << 30}",
        f"glibc.malloc.top_pad={1 << 30}",
    )
)
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def with_tunable(env: dict[str, str]) -> dict[str, str]:
    """`env` with TUNABLE appended to its GLIBC_TUNABLES (kept as is where hugetlb is already set either way)."""
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return dict(env)
    return {**env, "GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE}


def without_tunable(env: dict[str, str]) -> dict[str, str]:
    """`env` as it was before `reexec_with_hugepages` added TUNABLE (for a baseline that should not get it)."""
    ours = set(TUNABLE.split(":"))
    kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t not in ours]
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
