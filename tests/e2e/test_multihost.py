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


def _launch(root, steps):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    # DS_ENV_FILE: the launcher reads `.deepspeed_env` from the home or launch directory; an absolute path works too
    env.update(PATH=BIN + os.pathsep + env.get("PATH", ""), PDSH_SSH_ARGS_APPEND=f"-F {root / 'ssh' / 'config'}",
               DS_ENV_FILE=str(root / "ds_env"))
    with socket.socket() as sock:  # a port that is free here; the master is 10.77.0.1, a namespace of this machine
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    return subprocess.run(["deepspeed", "--hostfile", str(root / "hostfile"), "--no_ssh_check", "--master_addr",
                           "10.77.0.1", "--master_port", port, "--module", "megacoca.train", "--config",
                           str(root / "tiny.yaml"), "--train-shards", str(root / "shapes" / "train"), "--run-dir",
                           str(root / "run"), "--steps", str(steps), "--resume", "auto"],
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
