"""How many threads tieaudit's numeric work (numpy's BLAS, torch) may use: the CPUs this process can really run on now.

BLAS libraries start one thread per core and spin while they wait for each other; when another process holds one of
the cores, every product then waits for a thread that is not running, and the wall time multiplies (measured in
benchmarks/README.md). So the budget is the CPUs the process may run on (its affinity mask and, in a container, the
cgroup CPU quota) less those other processes keep busy right now (the kernel's count of runnable tasks in
/proc/loadavg, ours excluded), and at least 1. `numeric_threads()` applies it for the duration of an audit step.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

_active: list[int] = []  # the budget of the innermost `numeric_threads()` in effect


def allowed_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def busy_elsewhere() -> int:
    """Runnable tasks of other processes right now (the 4th field of /proc/loadavg counts ours too)."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)


def budget() -> int:
    """Threads worth starting now: the CPUs this process may use that nobody else is using (at least 1)."""
    return max(1, allowed_cpus() - busy_elsewhere())


@contextlib.contextmanager
def numeric_threads() -> Iterator[int]:
    """Size numpy's BLAS and torch's intra-op pool to `budget()` until the block ends (restored after). torch is
    sized now if already imported, else by `size_torch` where it is imported inside the block."""
    n = budget()
    _active.append(n)
    torch_before = _size_loaded_torch(n)
    try:
        with _blas_limit(n):
            yield n
    finally:
        _active.pop()
        if torch_before is not None and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(torch_before)


@contextlib.contextmanager
def reader_thread() -> Iterator[bool]:
    """Whether a loop should read its next chunk on a thread of its own while it computes on this one: yes when the
    budget in effect (`numeric_threads()`, else `budget()` now) is at least 2, and BLAS then gets one thread less
    until the block ends (measured: reading and decoding overlap with the products, where two BLAS threads and a
    reader on two cores only contend)."""
    n = _active[-1] if _active else budget()
    if n < 2:
        yield False
        return
    with _blas_limit(n - 1):
        yield True


def size_torch(torch: object) -> None:
    """Apply the budget in effect (if any) to torch, right after a lazy `import torch`."""
    if _active:
        torch.set_num_threads(_active[-1])  # type: ignore[attr-defined]


def _size_loaded_torch(n: int) -> int | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    before: int = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


@contextlib.contextmanager
def _blas_limit(n: int) -> Iterator[None]:
    import numpy  # noqa: F401  (loaded first: threadpoolctl limits the libraries loaded when it is called)

    try:
        from threadpoolctl import threadpool_limits  # lazy: ~10 ms, only where numeric work follows
    except ImportError:  # an environment without it: the libraries' own defaults
        yield
        return
    with threadpool_limits(limits=n):
        yield
