"""`deepspeed --hostfile` across two hosts for real: two network namespaces on a bridge, each with its own sshd
(scripts/test_hosts.sh, as root), the launcher's default pdsh over ssh starting one rank on each, the ranks
talking gloo over the namespaces' eth0 (GLOO_SOCKET_IFNAME from a .deepspeed_env file). The run trains,
writes a complete checkpoint, and a second launch resumes from it across the hosts."""

import json
import os
import socket
import subprocess

import pytest
from tiny_run import BIN, REPO, make_tiny_run, root_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hosts")
    with root_service("test_hosts.sh", root, why="the multi-host test makes network namespaces and starts sshd",
                      tests="tests/e2e/test_multihost.py"):
        make_tiny_run(root)
        (root / "ds_env").write_text("GLOO_SOCKET_IFNAME=eth0\nOMP_NUM_THREADS=1\n")
        yield root


def _launch(root, steps, extra=(), env_file="ds_env", run="run"):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    # DS_ENV_FILE: the launcher reads `.deepspeed_env` from the home or launch directory; an absolute path works too
    env.update(PATH=BIN + os.pathsep + env.get("PATH", ""), PDSH_SSH_ARGS_APPEND=f"-F {root / 'ssh' / 'config'}",
               DS_ENV_FILE=str(root / env_file))
    with socket.socket() as sock:  # a port that is free here; the master is 10.77.0.1, a namespace of this machine
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    return subprocess.run(["deepspeed", "--hostfile", str(root / "hostfile"), "--no_ssh_check", "--master_addr",
                           "10.77.0.1", "--master_port", port, "--module", "megacoca.train", "--config",
                           str(root / "tiny.yaml"), "--train-shards", str(root / "shapes" / "train"), "--run-dir",
                           str(root / run), "--steps", str(steps), "--resume", "auto", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.timeout(600)
def test_two_hosts_train_checkpoint_and_resume(hosts):
    first = _launch(hosts, 3)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # one rank started on each host through pdsh (its output lines carry the host's address)
    assert "10.77.0.1: " in first.stdout and "10.77.0.2: " in first.stdout
    assert "dp=2 pp=1 tp=1 (world 2)" in first.stdout
    assert os.path.isfile(hosts / "run" / "checkpoints" / "step00000003" / "COMPLETE")
    second = _launch(hosts, 5)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step00000003" in second.stdout
    steps = [json.loads(line)["step"] for line in open(hosts / "run" / "metrics.jsonl") if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5]


def test_a_host_whose_rank_dies_while_connecting_does_not_hang_the_other(hosts):
    """The second host's rank dies before the process group forms (MEGACOCA_FAULTS kills rank 1 as it starts
    checking its input, where a host that cannot reach the others would fail while connecting): the first host's
    rank ends itself after fault.rendezvous_timeout_s with status 124 and one line, and the launch ends well
    within that plus 10 s of the death, not after the 30-minute collective timeout."""
    (hosts / "ds_env_kill").write_text((hosts / "ds_env").read_text() + "MEGACOCA_FAULTS=kill_at=rank1@check:begin\n")
    import time

    began = time.monotonic()
    launched = _launch(hosts, 2, ["--set", "fault.rendezvous_timeout_s=10"], env_file="ds_env_kill", run="run_kill")
    took = time.monotonic() - began
    assert launched.returncode != 0, launched.stdout[-2000:] + launched.stderr[-2000:]
    output = launched.stdout + launched.stderr
    assert "could not set up the process group of 2 ranks within 10 s (fault.rendezvous_timeout_s)" in output, \
        output[-3000:]
    assert took < 120, took  # imports (~20-40 s on a loaded 2-core machine) + 10 s + the launcher's teardown
    print(f"launch ended after {took:.1f} s with status {launched.returncode}")
