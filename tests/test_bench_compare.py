"""Pieces of ``parley bench compare`` that its figures rest on: the floor peers and the
keep-up scenario deliver everything, and a server's CPU counts its worker processes."""

import subprocess
import sys
from contextlib import AbstractContextManager
from typing import Any

import pytest

from loadtests.compare import parley_target, peer_target
from loadtests.proc import cpu_times, family
from loadtests.scenarios import Target, run_broadcast


def _keep_up(target: AbstractContextManager[Target]) -> dict[str, Any]:
    with target as t:
        row = run_broadcast(t, "k", receivers=20, messages=40, rate=100, processes=1, timeout=30)
    return row.as_dict()


@pytest.mark.parametrize("ruler", ["floor", "trio-floor"])
def test_the_floor_peers_deliver_every_message_in_order(ruler: str) -> None:
    d = _keep_up(peer_target(ruler, None))
    assert d["deliveries"] == 20 * 40
    assert (d["lost"], d["gaps"], d["reordered"], d["duplicates"]) == (0, 0, 0, 0)
    assert d["messages_per_s"] > 0  # the publisher's frames were acked with "ok"


def test_parley_keeps_up_with_the_k_scenario_and_the_row_splits_cpu() -> None:
    d = _keep_up(parley_target(None, []))
    assert d["deliveries"] == 20 * 40
    assert (d["lost"], d["gaps"], d["reordered"], d["duplicates"]) == (0, 0, 0, 0)
    assert 0 <= d["server_system_us_per_delivery"] <= d["server_us_per_delivery"]


SPIN_IN_A_CHILD = """
import subprocess, sys, threading, time
started = []
def start():  # from a thread that lives on, as trio.run_process's does
    started.append(subprocess.Popen([sys.executable, "-c",
        "import time\\nend = time.process_time() + 0.4\\nwhile time.process_time() < end: pass\\n"
        "print('spun', flush=True)\\ntime.sleep(30)"], stdout=subprocess.PIPE, text=True))
    time.sleep(30)
thread = threading.Thread(target=start, daemon=True)
thread.start()
while not started:
    time.sleep(0.01)
child = started[0]
print(child.pid, flush=True)
child.stdout.readline()
print("spun", flush=True)
child.wait()
"""


def test_a_servers_cpu_includes_its_worker_processes() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", SPIN_IN_A_CHILD], stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            child = int(parent.stdout.readline())
            assert parent.stdout.readline().strip() == "spun"
            assert family(parent.pid) == [parent.pid, child]
            user, system = cpu_times(parent.pid)
            assert user + system >= 0.35  # the child's spin; the parent itself only waited
        finally:
            for pid in family(parent.pid)[::-1]:
                subprocess.run(["kill", str(pid)], check=False)
