"""Every launch form runs a couple of real training steps of a tiny CoCa on synth-shapes (CPU, gloo, ZeRO-3 bf16):
`deepspeed --num_gpus 2 --module`, `deepspeed --hostfile` with the module file, `torchrun`, 4-rank tensor- and
pipeline-parallel layouts, and a plain single process through the `megacoca train` console script; bad input
under the deepspeed launcher exits with one line."""

import json
import os
import socket
import subprocess

import pytest
from tiny_run import BIN, REPO, make_tiny_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("launchers")
    make_tiny_run(root, env=_env())
    return root


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _train_args(data, run_dir):
    return ["--config", str(data / "tiny.yaml"), "--train-shards", str(data / "shapes" / "train"),
            "--run-dir", str(run_dir)]


def _run(cmd, timeout=400):
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    return result


def _check_trained(result, run_dir, world, tp=1, pp=1):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 for r in records)
    assert f"dp={world // (tp * pp)} pp={pp} tp={tp} (world {world})" in result.stdout
    assert os.path.isfile(run_dir / "checkpoints" / "step00000002" / "COMPLETE")


def test_deepspeed_hostfile_module_file(data):
    run_dir = data / "ds_hostfile"
    hostfile = data / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # One host and no ssh on the test machine: --no_ssh_check and an explicit master address.
    result = _run(["deepspeed", "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
                   "--master_port", _port(), os.path.join(REPO, "megacoca", "train.py"), *_train_args(data, run_dir)])
    _check_trained(result, run_dir, 2)


def test_deepspeed_num_gpus_module_then_resume_under_another_layout(data):
    """`deepspeed --num_gpus 2 --module megacoca.train` with the periodic eval hook; its dp=2 ZeRO-3 checkpoint
    resumed through the launcher at TP=2 (dp=1) under ZeRO-1: the run says what it reshaped and continues from
    step 2."""
    first, second = data / "reshape_dp2", data / "reshape_tp2"
    result = _run(["deepspeed", "--num_gpus", "2", "--master_port", _port(), "--module", "megacoca.train",
                   *_train_args(data, first), "--val-shards", str(data / "shapes" / "val"), "--set", "eval.every=2"])
    _check_trained(result, first, 2)
    evals = [json.loads(line) for line in open(first / "metrics.jsonl") if '"eval/' in line]
    assert [r["step"] for r in evals] == [2]  # the eval hook ran through the launcher
    result = _run(["deepspeed", "--num_gpus", "2", "--master_port", _port(), "--module", "megacoca.train",
                   *_train_args(data, second), "--set", "parallel.tp=2", "--deepspeed-config", "zero1_bf16",
                   "--resume", str(first / "checkpoints"), "--steps", "4"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("at step 2, reshaped dp=2 x pp=1 x tp=1 ZeRO-3 -> dp=1 x pp=1 x tp=2 ZeRO-1" in result.stdout)
    records = [r for r in map(json.loads, open(second / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == [3, 4] and all(r["loss"] > 0 for r in records)


def test_deepspeed_four_ranks_tensor_parallel(data):
    """TP=2 x DP=2 through the deepspeed launcher, with the sharded eval hook (the final eval of a run whose
    eval.every falls on no step) and a TP checkpoint that `megacoca convert from-deepspeed` merges into a model
    directory."""
    run_dir = data / "ds_tp"
    result = _run(["deepspeed", "--num_gpus", "4", "--master_port", _port(), "--module", "megacoca.train",
                   *_train_args(data, run_dir), "--set", "parallel.tp=2", "--val-shards", str(data / "shapes" / "val"),
                   "--set", "eval.every=5"])
    _check_trained(result, run_dir, 4, tp=2)
    # eval.every=5 never falls on a step of this 2-step run: the finished model is evaluated anyway
    assert [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl") if '"eval/' in line] == [2]
    converted = _run([os.path.join(BIN, "megacoca"), "convert", "from-deepspeed", "--input",
                      str(run_dir / "checkpoints"), "--output", str(run_dir / "exported")])
    assert converted.returncode == 0, converted.stderr[-3000:]
    config = json.loads((run_dir / "exported" / "config.json").read_text())
    assert config["model"]["vision_width"] == 32 and (run_dir / "exported" / "model.safetensors").stat().st_size


def test_deepspeed_four_ranks_pipeline_tensor_parallel(data):
    """PP=2 x TP=2 through the deepspeed launcher under ZeRO-3 (each stage its own engine), with the split and
    the schedule logged, the pipelined eval hook, and a checkpoint that `megacoca convert from-deepspeed` merges over stages and tensor
    ranks into one model directory."""
    run_dir = data / "ds_pp"
    result = _run(["deepspeed", "--num_gpus", "4", "--master_port", _port(), "--module", "megacoca.train",
                   *_train_args(data, run_dir), "--set", "parallel.tp=2", "--set", "parallel.pp=2",
                   "--set", "schedule.micro_batch_size=2", "--val-shards", str(data / "shapes" / "val"),
                   "--set", "eval.every=2"])
    _check_trained(result, run_dir, 4, tp=2, pp=2)
    evals = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"eval/' in line]
    assert [r["step"] for r in evals] == [2] and "eval/zeroshot_top1" in evals[0]  # pipelined eval, by rank 0
    assert "pipeline split over 2 stages" in result.stdout and "1F1B over 4 micro-batches" in result.stdout
    converted = _run([os.path.join(BIN, "megacoca"), "convert", "from-deepspeed", "--input",
                      str(run_dir / "checkpoints"), "--output", str(run_dir / "exported")])
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert (run_dir / "exported" / "model.safetensors").stat().st_size


def test_torchrun_four_ranks_pipeline_with_data_parallel(data):
    """torchrun's rank variables (RANK, LOCAL_RANK, WORLD_SIZE, the rendezvous) at 4 ranks, PP=2 x DP=2. Tensor
    parallelism through a launcher is the deepspeed tests' above; the layouts' numbers are tests/distributed's."""
    run_dir = data / "torchrun_pp"
    result = _run(["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "megacoca.train",
                   *_train_args(data, run_dir), "--set", "parallel.pp=2", "--set", "schedule.micro_batch_size=2"])
    _check_trained(result, run_dir, 4, pp=2)


def test_pipeline_rank_killed_mid_schedule_ends_the_job(data):
    """SIGKILL of the last stage while the first one is in the middle of a step (waiting for its gradients):
    the launcher ends the whole job non-zero within seconds instead of leaving stage 0 blocked in a receive."""
    import signal
    import time

    run_dir = data / "ds_pp_killed"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", _port(), "--module", "megacoca.train",
           *_train_args(data, run_dir), "--set", "parallel.pp=2", "--set", "schedule.micro_batch_size=2",
           "--set", "schedule.steps=100000", "--set", "checkpoint.save_final=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        metrics = run_dir / "metrics.jsonl"
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        found = subprocess.run(["pgrep", "-f", f"local_rank=1 .*{run_dir}"], capture_output=True, text=True)
        pids = [int(pid) for pid in found.stdout.split()]
        assert pids, "rank 1 not found"
        os.kill(pids[0], signal.SIGKILL)
        killed_at = time.time()
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0, output[-3000:]
        assert time.time() - killed_at < 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_preemption_signal_under_deepspeed_checkpoints_and_exits_for_requeue(data):
    """SIGUSR1 to one rank of a `deepspeed --num_gpus 2` run: both ranks stop after the same step, a complete
    checkpoint is there, the launcher exits with REQUEUE_EXIT_CODE (what slurm/*.sbatch requeue on), and
    `--resume auto` continues from it to the end."""
    import signal
    import time

    from megacoca.launch.preemption import REQUEUE_EXIT_CODE

    run_dir = data / "ds_preempted"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", _port(), "--module", "megacoca.train",
           *_train_args(data, run_dir), "--set", "schedule.steps=100000", "--set", "checkpoint.resume=auto"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        pids = [int(p) for p in subprocess.run(["pgrep", "-f", f"local_rank=1 .*{run_dir}"], capture_output=True,
                                                text=True).stdout.split()]
        assert pids, "rank 1 not found"
        os.kill(pids[0], signal.SIGUSR1)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    assert "preempted (" in output
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl") if '"loss"' in line]
    assert os.path.isfile(run_dir / "checkpoints" / f"step{steps[-1]:08d}" / "COMPLETE")
    # the requeued job: the same command with a reachable end, resumed from that checkpoint
    again = _run(["deepspeed", "--num_gpus", "2", "--master_port", _port(), "--module", "megacoca.train",
                  *_train_args(data, run_dir), "--set", f"schedule.steps={steps[-1] + 2}",
                  "--set", "checkpoint.resume=auto"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout and f"step{steps[-1]:08d}" in again.stdout


def test_single_process_console_script(data):
    run_dir = data / "single"
    result = _run(["megacoca", "train", *_train_args(data, run_dir), "--set", "schedule.micro_batch_size=8"])
    _check_trained(result, run_dir, 1)


def test_bad_input_under_deepspeed_is_one_line_and_no_hang(data):
    result = _run(["deepspeed", "--num_gpus", "2", "--master_port", _port(), "--module", "megacoca.train",
                   *_train_args(data, data / "bad"), "--set", "schedule.micro_batch_size=3"], timeout=120)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "megacoca train: error:" in line]
    assert errors == ["megacoca train: error: schedule.global_batch_size 8 is not divisible by micro_batch_size 3 "
                      "x dp 2 = 6"]
    assert "Traceback" not in result.stderr
