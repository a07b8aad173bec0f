"""slurm/*.sbatch on a real SLURM cluster (Debian's munge, slurmctld and slurmd, installed and started by
scripts/slurm_cluster.sh as root, stopped after the tests): this host is one node (partition "debug"), and two
network namespaces (scripts/test_hosts.sh: mch1 10.77.0.1, mch2 10.77.0.2) with a slurmd each are two more
(partition "netns"). Both batch scripts train the tiny model on 2 ranks to a complete checkpoint, on one node
and across the two namespace nodes; a job signalled mid-run (as `--signal=B:USR1@...` does before the time limit)
checkpoints, requeues itself, resumes and finishes with exactly the losses of an uninterrupted job, and so does
a chain of two jobs (`--dependency=afterany`); bad input ends the job with a one-line message."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from tiny_run import BIN, REPO, make_tiny_run, root_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    why = "the SLURM tests make network namespaces and start sshd, munged and slurmd"
    tests = "tests/e2e/test_slurm.py"
    with root_service("test_hosts.sh", root / "hosts", why=why, tests=tests), \
            root_service("slurm_cluster.sh", root / "cluster", "2", "mch1=10.77.0.1", "mch2=10.77.0.2", why=why,
                         tests=tests):
        make_tiny_run(root)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                        "LOCAL_RANK", "MASTER_"))}
        env.update(SLURM_CONF=str(root / "cluster" / "slurm.conf"), PATH=BIN + os.pathsep + env.get("PATH", ""),
                   MEGACOCA_PYTHON=sys.executable, MEGACOCA_PROCS_PER_NODE="2", OMP_NUM_THREADS="1")
        yield root, env


def _sbatch(cluster, script, run_dir, *extra, sbatch_args=()):
    root, env = cluster
    out = subprocess.run(["sbatch", "--parsable", "-o", str(run_dir) + ".out", *sbatch_args,
                          os.path.join("slurm", script), "--config", str(root / "tiny.yaml"),
                          "--train-shards", str(root / "shapes" / "train"), "--run-dir", str(run_dir), *extra],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def _occupied_port():
    """A socket listening on a port of this host (node "debug") from 21000 on, followed by a free one."""
    for port in range(21000, 22000):
        sock, after = socket.socket(), socket.socket()
        try:
            sock.bind(("0.0.0.0", port))
            after.bind(("0.0.0.0", port + 1))
        except OSError:
            sock.close()
            continue
        finally:
            after.close()
        sock.listen()
        return sock, port
    raise AssertionError("no free port pair in 21000-22000")


def _state(cluster, job):
    """`scontrol show job` as a dict; {"error": ...} when scontrol says nothing about the job."""
    shown = subprocess.run(["scontrol", "show", "job", job], env=cluster[1], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S+)", shown.stdout)) or {"error": (shown.stderr or "no such job").strip()}


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED")


def _why(cluster, job, run_dir=None):
    """What to read when a job did not end as expected: its state, its log's tail and slurmctld's lines on it."""
    log_dir = cluster[0] / "cluster" / "log"
    ctld = [line for line in open(log_dir / "slurmctld.log", errors="replace") if f"JobId={job}" in line
            or f"job {job}" in line] if (log_dir / "slurmctld.log").exists() else []
    out = open(str(run_dir) + ".out", errors="replace").read()[-3000:] if run_dir else ""
    state = {key: value for key, value in _state(cluster, job).items()
             if key in ("JobState", "Reason", "Restarts", "ExitCode", "RunTime", "error")}
    return f"job {job}: {state}\n--- slurmctld:\n{''.join(ctld[-30:])}--- job log:\n{out}"


def _wait(cluster, job, timeout=300, restarts=0, run_dir=None):
    """The job's state once it has ended after `restarts` requeues (a requeued job passes through REQUEUED and
    PENDING, never an ended state); fails with the job's log and slurmctld's lines when it does not end in time."""
    deadline, ended_early = time.time() + timeout, None
    while time.time() < deadline:
        state = _state(cluster, job)
        if state.get("JobState") in ENDED:
            if int(state.get("Restarts", "0")) >= restarts:
                return state
            ended_early = ended_early or time.time()
            if time.time() - ended_early > 30:  # ended before its requeue, and still ended: it never requeued
                raise AssertionError(f"ended without its {restarts} requeue(s): {_why(cluster, job, run_dir)}")
        if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime":
            # a requeued job waits ~2 minutes before it may start again; let it start now
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster[1], check=False,
                           capture_output=True)
        time.sleep(1)
    raise AssertionError(f"not ended within {timeout}s: {_why(cluster, job, run_dir)}")


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]


@pytest.mark.parametrize("script, sbatch_args", [("train_srun.sbatch", ("--ntasks-per-node", "2")),
                                                 ("train.sbatch", ("--cpus-per-task", "2"))])
def test_batch_script_trains_to_a_complete_checkpoint(cluster, script, sbatch_args):
    run_dir = cluster[0] / script.replace(".", "_")
    job = _sbatch(cluster, script, run_dir, "--steps", "2", sbatch_args=sbatch_args)
    state = _wait(cluster, job, run_dir=run_dir)
    log = open(str(run_dir) + ".out").read()
    assert state["JobState"] == "COMPLETED", _why(cluster, job, run_dir)
    assert "dp=2 pp=1 tp=1 (world 2)" in log and "training exited with status 0" in log
    assert os.path.isfile(run_dir / "checkpoints" / "step00000002" / "COMPLETE")
    assert len(_losses(run_dir)) == 2


@pytest.mark.parametrize("script, sbatch_args", [("train_srun.sbatch", ("--ntasks-per-node", "1")),
                                                 ("train.sbatch", ())])
def test_two_node_allocation_trains_across_the_nodes(cluster, script, sbatch_args):
    """Two slurmd nodes, each in its own network namespace: one rank per node, talking over the bridge."""
    run_dir = cluster[0] / ("two_nodes_" + script.replace(".", "_"))
    job = _sbatch(cluster, script, run_dir, "--steps", "2",
                  sbatch_args=("-p", "netns", "--nodes", "2", "--export", "ALL,MEGACOCA_PROCS_PER_NODE=1,"
                               "GLOO_SOCKET_IFNAME=eth0", *sbatch_args))
    state = _wait(cluster, job, run_dir=run_dir)
    log = open(str(run_dir) + ".out").read()
    assert state["JobState"] == "COMPLETED", _why(cluster, job, run_dir)
    assert "on 2 node(s) mch1 mch2, rendezvous 10.77.0.1:" in log  # the master is the first node's NodeAddr
    assert "dp=2 pp=1 tp=1 (world 2)" in log and "training exited with status 0" in log
    if script == "train.sbatch":  # one deepspeed launcher per node
        assert "node_rank=0" in log and "node_rank=1" in log
    assert os.path.isfile(run_dir / "checkpoints" / "step00000002" / "COMPLETE")
    assert len(_losses(run_dir)) == 2


@pytest.mark.timeout(600)
def test_signalled_job_checkpoints_requeues_and_resumes_exactly(cluster):
    steps = "24"
    whole_dir, cut_dir = cluster[0] / "whole", cluster[0] / "cut"
    whole = _sbatch(cluster, "train_srun.sbatch", whole_dir, "--steps", steps, sbatch_args=("--ntasks-per-node", "2"))
    assert _wait(cluster, whole, run_dir=whole_dir)["JobState"] == "COMPLETED", _why(cluster, whole, whole_dir)
    cut = _sbatch(cluster, "train_srun.sbatch", cut_dir, "--steps", steps, sbatch_args=("--ntasks-per-node", "2"))
    metrics = cut_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"loss"') >= 4):
        time.sleep(0.3)
    # what `#SBATCH --signal=B:USR1@180` does before the time limit: SIGUSR1 to the batch script
    subprocess.run(["scancel", "--signal=USR1", "--batch", cut], env=cluster[1], check=True)
    # Requeued: it passes through REQUEUED and PENDING, runs again, and completes.
    state = _wait(cluster, cut, timeout=400, restarts=1, run_dir=cut_dir)
    log = open(str(cut_dir) + ".out").read()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", _why(cluster, cut, cut_dir)
    assert "requeueing job" in log and "preempted (SIGUSR1)" in log and "resumed from" in log
    assert _losses(cut_dir) == _losses(whole_dir)  # steps 1-24 of the two, bit for bit


@pytest.mark.timeout(600)
def test_chain_of_jobs_continues_without_lost_steps(cluster):
    """The documented chain: the first job, told to stop (as at its time limit), checkpoints and exits without
    requeueing (MEGACOCA_REQUEUE=0); the next, submitted with --dependency=afterany, resumes and finishes."""
    root, env = cluster
    whole_dir, chain_dir = root / "whole", root / "chain"
    if not (whole_dir / "checkpoints" / "step00000024" / "COMPLETE").exists():  # run alone, not after the test above
        _wait(cluster, _sbatch(cluster, "train_srun.sbatch", whole_dir, "--steps", "24",
                               sbatch_args=("--ntasks-per-node", "2")))
    args = ("--steps", "24")
    first = _sbatch(cluster, "train_srun.sbatch", chain_dir, *args,
                    sbatch_args=("--ntasks-per-node", "2", "--export", "ALL,MEGACOCA_REQUEUE=0"))
    second = _sbatch(cluster, "train_srun.sbatch", chain_dir, *args,
                     sbatch_args=("--ntasks-per-node", "2", "--dependency", f"afterany:{first}"))
    metrics = chain_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"loss"') >= 4):
        time.sleep(0.3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", first], env=env, check=True)
    assert _wait(cluster, first, run_dir=chain_dir)["JobState"] == "COMPLETED", _why(cluster, first, chain_dir)
    assert _wait(cluster, second, run_dir=chain_dir)["JobState"] == "COMPLETED", _why(cluster, second, chain_dir)
    log = open(str(chain_dir) + ".out").read()
    assert "not requeueing (MEGACOCA_REQUEUE=0)" in log and "resumed from" in log and "requeueing job" not in log
    assert _losses(chain_dir) == _losses(whole_dir)


def test_rendezvous_port_is_checked_on_the_first_node(cluster):
    """The derived port skips ports in use; a busy MASTER_PORT, or no free port, is one line and exit 2."""
    root, env = cluster
    host = socket.gethostname()
    busy, port = _occupied_port()
    with busy:
        fake_job = dict(env, SLURM_JOB_ID=str(port - 20000), SLURM_JOB_NODELIST=host, SLURMD_NODENAME=host,
                        MEGACOCA_DIR=REPO)
        script = "source slurm/common.sh && echo MASTER_PORT=$MASTER_PORT"

        def common(**extra):
            return subprocess.run(["bash", "-c", script], env=dict(fake_job, **extra), cwd=REPO, capture_output=True,
                                  text=True)

        chosen = common()
        assert chosen.returncode == 0 and f"MASTER_PORT={port + 1}" in chosen.stdout, chosen
        none_free = common(MEGACOCA_PORT_TRIES="1")
        assert none_free.returncode == 2
        assert none_free.stderr == f"megacoca slurm: error: no free port on {host} among the 1 from {port} (set MASTER_PORT)\n"
        # a real job whose MASTER_PORT is in use on its first node fails at once with one line in its log
        run_dir = root / "busy_port"
        job = _sbatch(cluster, "train_srun.sbatch", run_dir, sbatch_args=("--ntasks-per-node", "2", "--export",
                                                                          f"ALL,MASTER_PORT={port}"))
        state = _wait(cluster, job, timeout=120)
    log = open(str(run_dir) + ".out").read()
    assert state["JobState"] == "FAILED"
    assert log.strip().splitlines()[-1] == (f"megacoca slurm: error: MASTER_PORT {port} is in use on {host}; "
                                            "choose a free one or unset it")


@pytest.mark.parametrize("args, message", [
    (("--recipe", "no_such_recipe"), "megacoca train: error: unknown recipe 'no_such_recipe'"),
    (("--set", "parallel.tp=3"), "megacoca train: error: parallel: tp 3 x pp 1 = 3 exceeds the world "
                                 "size 2"),
], ids=["missing-recipe", "layout-larger-than-allocation"])
def test_bad_input_is_one_line_in_the_job_log(cluster, args, message):
    run_dir = cluster[0] / ("bad_" + args[-1].replace("=", "_").replace(".", "_"))
    job = _sbatch(cluster, "train_srun.sbatch", run_dir, *args, sbatch_args=("--ntasks-per-node", "2"))
    state = _wait(cluster, job, timeout=120)
    log = open(str(run_dir) + ".out").read()
    assert state["JobState"] == "FAILED"
    assert message in log, log[-2000:]
