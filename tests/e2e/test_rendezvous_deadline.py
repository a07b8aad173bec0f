"""A rank that dies before the others connect: started as a launcher starts ranks (`python -m megacoca.train`, one
process per rank, RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), rank 1 is SIGKILLed as it starts checking its
input; rank 0, waiting in the rendezvous for it, ends with status 124 and one line within
fault.rendezvous_timeout_s plus 10 s, not after the collective timeout (30 minutes by default)."""

import os
import socket
import subprocess
import sys
import time

import pytest
from tiny_run import make_tiny_run

from megacoca.launch.watchdog import STALL_EXIT_CODE

RENDEZVOUS_S = 5

pytestmark = pytest.mark.slow  # two interpreters importing torch and DeepSpeed (~20 s): CI runs it (make test)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_rank_that_dies_before_connecting_ends_the_others(tmp_path):
    make_tiny_run(tmp_path)
    port = str(_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", MEGACOCA_FAULTS="kill_at=rank1@check:begin")
        command = [sys.executable, "-m", "megacoca.train", "--config", str(tmp_path / "tiny.yaml"),
                   "--train-shards", str(tmp_path / "shapes" / "train"), "--run-dir", str(tmp_path / "run"),
                   "--set", f"fault.rendezvous_timeout_s={RENDEZVOUS_S}"]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    began = time.monotonic()
    try:
        assert procs[1].wait(timeout=120) == -9
        rank1_died = time.monotonic()
        out, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - rank1_died
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert procs[0].returncode == STALL_EXIT_CODE, out + err
    lines = [line for line in err.splitlines() if "megacoca watchdog:" in line]
    assert len(lines) == 1, err
    assert "rank 0 (" in lines[0] and "could not set up the process group of 2 ranks within 5 s" in lines[0]
    assert f"127.0.0.1:{port}" in lines[0]
    # rank 0's deadline counts from its own rendezvous, which began before rank 1 died (both start together)
    assert waited <= RENDEZVOUS_S + 10, waited
    print(f"rank 0 ended {waited:.1f} s after rank 1 died ({time.monotonic() - began:.1f} s in all): {lines[0]}")
