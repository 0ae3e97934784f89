"""What the benchmarks read about a server process from /proc, and their progress lines."""

import os
import sys


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def family(pid: int) -> list[int]:
    """``pid`` and its live descendants (a server started with ``--workers N``): the
    children of every thread, as trio starts processes from worker threads."""
    found, i = [pid], 0
    while i < len(found):
        try:
            threads = os.listdir(f"/proc/{found[i]}/task")
        except OSError:
            threads = []
        for thread in threads:
            try:
                with open(f"/proc/{found[i]}/task/{thread}/children") as f:
                    found += [int(child) for child in f.read().split()]
            except OSError:
                pass
        i += 1
    return found


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its live descendants, all threads."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for member in family(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended between the listing and the read
        user += int(fields[11]) / tick
        system += int(fields[12]) / tick
    return user, system


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def status_kib(pid: int, key: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of a process and its live descendants, in KiB
    (summed: the peaks of several processes need not have been at the same time)."""
    total = 0
    for member in family(pid):
        try:
            with open(f"/proc/{member}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
        except (OSError, StopIteration):
            if member == pid:
                raise RuntimeError(f"no {key} for {pid}") from None
    return total
