"""A chaos run: train a tiny CoCa on 2 ranks through `megacoca train`'s own code path while faults hit it at random
(seeded, printed) steps, relaunch it with `--resume auto` after each, and check that the losses and the final
weights equal an uninterrupted run's, bit for bit. Prints the tally: faults injected and recovered, steps lost,
bytes of checkpoint lost.

    python scripts/chaos_run.py --seed 0                 # 120 steps, 2 ranks (~3 min on 2 CPU cores)
    python scripts/chaos_run.py --seed 1 --steps 60 --work /tmp/chaos

Faults (megacoca.launch.faults; each launch gets the next one, so a relaunch that replays its step runs clean):
kill -9 of a random rank as a step begins (3 times), SIGUSR1 to a random rank as a step begins (twice: the job
stops with a checkpoint and status 75), a rank stopped (SIGSTOP) as a step begins so the other's watchdog ends
the job (once), a full disk (ENOSPC) while a rank writes its optimizer shard (once), and a NaN loss at one step
(once; the step guard skips it: the uninterrupted run gets the same NaN step, so the two trajectories are the
same computation). Each launch is one process per rank forked as a launcher would start them (env:// rendezvous
on a free port), running `megacoca.cli.train.main`; a rank that dies takes the others down after a few seconds
(`grace`), as the deepspeed launcher and srun --kill-on-bad-exit do.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacoca.launch.ranks import RankFailure, run_ranks  # noqa: E402

PRELOAD = ["torch", "torch.distributed", "deepspeed", "megacoca.trainer", "megacoca.cli.train", "megacoca.eval",
           "deepspeed.runtime.zero.stage_1_and_2"]
TINY = ("{image_size: 32, patch_size: 8, vision_width: 32, vision_layers: 1, vision_heads: 2, vision_mlp_dim: 64, "
        "caption_queries: 8, pooler_heads: 2, context_length: 12, text_width: 32, text_heads: 2, text_mlp_dim: 64, "
        "text_layers: 1, decoder_layers: 1, embed_dim: 32}")
EVERY = 10  # checkpoint interval (steps)
WATCHDOG_S = 4.0


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, world_size: int, store_path: str, argv: list[str], port: int) -> int:
    os.environ["MASTER_PORT"] = str(port)  # the runner's dummy port: the CLI's env:// rendezvous needs a real one
    from megacoca.cli.train import main

    return main(argv)


def _argv(data: str, run_dir: str, steps: int, nan_step: int) -> list[str]:
    return ["--train-shards", os.path.join(data, "train"), "--run-dir", run_dir, "--resume", "auto",
            "--set", f"model.overrides={TINY}", "--set", f"schedule.steps={steps}",
            "--set", "schedule.global_batch_size=8", "--set", "schedule.micro_batch_size=4",
            "--set", "schedule.warmup_steps=5", "--set", "parallel.deepspeed_config=zero1_bf16",
            "--set", f"checkpoint.every={EVERY}", "--set", "checkpoint.keep=2", "--set", "eval.every=0",
            "--set", "logging.tensorboard=false", "--set", "logging.log_every=1", "--set", "data.tokenizer=clip-bpe",
            "--set", f"fault.watchdog_timeout_s={WATCHDOG_S}", "--set", "fault.collective_timeout_s=120",
            "--set", "fault.first_step_timeout_s=120"]


def launch(argv: list[str], faults: str, nan_step: int) -> tuple[str, str]:
    """One launch of the 2-rank job; (outcome, detail): "done", "requeue" (status 75 on every rank), "failed"."""
    env = {"MEGACOCA_FAULTS": ";".join(filter(None, [faults, f"nan_loss={nan_step}"])), "OMP_NUM_THREADS": "1"}
    try:
        codes = run_ranks(_rank, 2, argv, _port(), timeout=600, env=env, init=False, preload=PRELOAD, grace=3.0)
    except RankFailure as failure:
        return "failed", " ".join(str(failure).split())[-300:]
    if codes == [0, 0]:
        return "done", ""
    if codes == [75, 75]:
        return "requeue", ""
    return "failed", f"exit codes {codes}"


def _losses(run_dir: str) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _checkpoints(run_dir: str) -> tuple[list[int], int]:
    """(complete checkpoint steps, bytes held by incomplete tags: what a relaunch will discard; a save that failed
    cleanly has removed its partial tag already)."""
    from megacoca.checkpoint.tags import complete_checkpoints, incomplete_checkpoints

    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        return [], 0
    partial = sum(os.path.getsize(os.path.join(root, name)) for _, path in incomplete_checkpoints(directory)
                  for root, _, names in os.walk(path) for name in names)
    return [step for step, _ in complete_checkpoints(directory)], partial


def plan_faults(seed: int, steps: int) -> list[tuple[int, str]]:
    """[(step, MEGACOCA_FAULTS entry)] in step order, and the NaN step (last element's step is the NaN's)."""
    rng = random.Random(seed)
    kinds = ["kill"] * 3 + ["signal"] * 2 + ["stall", "enospc"]
    rng.shuffle(kinds)
    chosen = sorted(rng.sample(range(3, steps - 1), len(kinds)))
    plan = []
    for step, kind in zip(chosen, kinds):
        rank = rng.randrange(2)
        if kind == "enospc":  # the save at or after that step: the first save of the launch that reaches it
            plan.append((step, f"enospc_at=rank{rank}@save:after_optim_states"))
        else:
            plan.append((step, f"{kind}=rank{rank}@{step}"))
    return plan


def _final_weights(run_dir: str):
    from megacoca.checkpoint import complete_checkpoints, consolidated_state_dict

    step, path = complete_checkpoints(os.path.join(run_dir, "checkpoints"))[-1]
    return step, consolidated_state_dict(path)


def chaos(seed: int, steps: int, work: str) -> dict:
    """The chaos run of `seed` (see the module doc); returns the tally and whether it matched the reference."""
    import torch

    data = os.path.join(work, "shapes")
    if not os.path.isdir(os.path.join(data, "train")):
        subprocess.run([sys.executable, "-m", "megacoca", "data", "synth-shapes", "--out", data, "--train-samples",
                        "256", "--val-samples", "16", "--image-size", "32", "--shard-size", "32", "--workers", "1"],
                       check=True, capture_output=True)
    nan_step = random.Random(f"{seed}-nan").randrange(3, steps)
    plan = plan_faults(seed, steps)
    print(f"seed {seed}: NaN loss at step {nan_step}; faults " + ", ".join(f"{entry}" for _, entry in plan),
          flush=True)
    reference = os.path.join(work, f"reference_{steps}_{seed}")
    if not os.path.isfile(os.path.join(reference, "metrics.jsonl")) or max(_losses(reference), default=0) < steps:
        shutil.rmtree(reference, ignore_errors=True)
        outcome, detail = launch(_argv(data, reference, steps, nan_step), "", nan_step)
        assert outcome == "done", f"the reference run failed: {detail}"
    run_dir = os.path.join(work, f"chaos_{steps}_{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)
    # steps_lost: steps trained after the last complete checkpoint and trained again after a relaunch;
    # bytes_lost: incomplete checkpoint tags a relaunch discards (complete checkpoints are never lost: asserted)
    tally = {"injected": 0, "recovered": 0, "steps_lost": 0, "bytes_lost": 0, "launches": 0}
    pending, began = list(plan), time.monotonic()
    while True:
        resumed = max(_checkpoints(run_dir)[0], default=0)
        while pending and pending[0][0] <= resumed:  # a fault whose step the run has passed will not come again
            pending.pop(0)
        faults = pending[0][1] if pending else ""
        outcome, detail = launch(_argv(data, run_dir, steps, nan_step), faults, nan_step)
        tally["launches"] += 1
        reached = max(_losses(run_dir), default=0)
        before = set(_checkpoints(run_dir)[0]) if tally["launches"] == 1 else kept
        complete, partial = _checkpoints(run_dir)
        kept = set(complete)
        assert max(before, default=0) <= max(complete, default=0), f"a complete checkpoint was lost: {complete}"
        print(f"  launch {tally['launches']}: from step {resumed}, {faults or 'no fault'} -> {outcome} at step "
              f"{reached} (complete checkpoints {complete}, {partial} bytes in an incomplete one) {detail[:160]}",
              flush=True)
        if faults:
            tally["injected"] += 1
            pending.pop(0)
            tally["steps_lost"] += max(reached - max(complete, default=0), 0)
            tally["bytes_lost"] += partial
        if outcome == "done":
            break
        assert tally["launches"] < 3 * len(plan) + 3, "the run does not converge"
    tally["recovered"] = tally["injected"]  # the run finished after every one of them
    expected, got = _losses(reference), _losses(run_dir)
    same_losses = expected == got
    ref_step, ref_weights = _final_weights(reference)
    run_step, run_weights = _final_weights(run_dir)
    same_weights = ref_step == run_step == steps and ref_weights.keys() == run_weights.keys() and all(
        torch.equal(ref_weights[name], run_weights[name]) for name in ref_weights)
    tally.update(seed=seed, steps=steps, same_losses=same_losses, same_weights=same_weights,
                 seconds=round(time.monotonic() - began, 1))
    if not same_losses:
        first = min(step for step in set(expected) | set(got) if expected.get(step) != got.get(step))
        tally["first_different_step"] = first
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="megacoca_chaos_")
    ok = True
    for seed in args.seed:
        tally = chaos(seed, args.steps, work)
        print(json.dumps(tally))
        print(f"seed {seed}: {tally['injected']} faults injected, {tally['recovered']} recovered, "
              f"{tally['steps_lost']} steps lost, {tally['bytes_lost']} bytes of checkpoint lost, "
              f"{tally['launches']} launches in {tally['seconds']} s; losses "
              f"{'bit-identical' if tally['same_losses'] else 'DIFFERENT'}, final weights "
              f"{'bit-identical' if tally['same_weights'] else 'DIFFERENT'}", flush=True)
        ok = ok and tally["same_losses"] and tally["same_weights"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
