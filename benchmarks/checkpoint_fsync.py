"""What making a checkpoint durable costs: the seconds each save spends in fsync (every file a rank wrote, the tag
directory, COMPLETE and `latest`: megacoca.checkpoint.state) against the whole save, on this machine's disk.

    python benchmarks/checkpoint_fsync.py                       # 2 ranks, ZeRO-1 bf16, a 74M-parameter CoCa (~3 min)
    python benchmarks/checkpoint_fsync.py --width 256 --saves 3 --rounds 1

Each save is timed by the Trainer (its log line "checkpoint ...: saved in X s, of which Y s syncing"), on rank 0;
the figures are rank 0's. The baseline arm is the same run with every fsync made a no-op (patched in the ranks of
this benchmark only); the arms alternate. Each file's fsync starts on a worker thread as soon as DeepSpeed has
written it, so the disk writes while the next file is serialised; what the save still waits for is the remainder. The checkpoint's size on disk is measured after the run. fsync waits for the device to
hold what the page cache holds, so its cost is the disk's write time of the checkpoint's bytes that had not
reached it yet: on a fast local disk a small share, on a slow network filesystem the most of a save.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacoca.launch.ranks import run_ranks  # noqa: E402

SAVED = re.compile(r"checkpoint (\S+): saved in ([0-9.]+) s, of which ([0-9.]+) s syncing")


def _train(rank: int, world_size: int, run_dir: str, width: int, saves: int, durable: bool) -> list[str]:
    import megacoca.checkpoint.files as files
    from megacoca.config.recipes import build_config
    from megacoca.parallel.dims import ParallelDims
    from megacoca.trainer import Trainer
    from tests.distributed.memory_data import MemoryLoader

    job = build_config(overrides=["parallel.deepspeed_config=zero1_bf16", f"schedule.steps={saves}",
                                  "schedule.global_batch_size=4", "schedule.micro_batch_size=2", "checkpoint.every=1",
                                  "checkpoint.keep=1", f"logging.run_dir={run_dir}", "logging.tensorboard=false"])
    job.model.overrides = {"image_size": 32, "patch_size": 8, "vision_width": width, "vision_layers": 6,
                           "vision_heads": 8, "vision_mlp_dim": 4 * width, "caption_queries": 16, "pooler_heads": 8,
                           "vocab_size": 8192, "context_length": 16, "text_width": width, "text_heads": 8,
                           "text_mlp_dim": 4 * width, "text_layers": 6, "decoder_layers": 6, "embed_dim": width}
    if not durable:  # the baseline: the same save with every fsync a no-op (this process only)
        files.fsync_path = lambda path: None
    dims = ParallelDims.from_config(job.parallel, world_size).build()
    trainer = Trainer(job, MemoryLoader(2, dims.dp_rank, dims.dp_size, job.model_config()), dims=dims)
    said, info = [], trainer.logger.info
    trainer.logger.info = lambda line: (said.append(line), info(line))
    trainer.train()
    params = sum(p.numel() for p in trainer.engine.module.parameters())
    trainer.close()
    return [f"params {params}"] + said


def _saves(args, durable: bool) -> tuple[list[tuple[float, float]], str, float]:
    """[(total s, fsync wait s)] of each save of one run, its parameter line, the checkpoint's MiB on disk."""
    with tempfile.TemporaryDirectory(prefix="megacoca_fsync_", dir=os.getcwd()) as run_dir:
        said = run_ranks(_train, args.ranks, run_dir, args.width, args.saves, durable, timeout=900,
                         preload=["torch", "deepspeed", "megacoca.trainer"])[0]
        tag = max(name for name in os.listdir(os.path.join(run_dir, "checkpoints")) if name.startswith("step"))
        tag_dir = os.path.join(run_dir, "checkpoints", tag)
        size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(tag_dir) for name in names)
    saves = [tuple(map(float, SAVED.search(line).groups()[1:])) for line in said if SAVED.search(line)]
    return saves, said[0], size / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each arm, alternated")
    args = parser.parse_args()
    totals: dict[str, list[float]] = {"durable": [], "no fsync": []}
    waits: list[float] = []
    for round_ in range(args.rounds):
        for arm in ("durable", "no fsync"):
            saves, params, mib = _saves(args, arm == "durable")
            steady = saves[1:] or saves  # the first save also makes the directories and warms the page cache
            totals[arm] += [total for total, _ in steady]
            if arm == "durable":
                waits += [wait for _, wait in steady]
            print(f"round {round_ + 1} {arm:<9}: saves " + ", ".join(f"{t:.2f}" for t, _ in saves) + " s"
                  + (", fsync wait " + ", ".join(f"{w:.3f}" for _, w in saves) + " s" if arm == "durable" else ""))
    print(params.replace("params", "parameters:"), f"| checkpoint on disk: {mib:.1f} MiB ({args.ranks} ranks, "
          "ZeRO-1 bf16: model + fp32 master + Adam moments)")
    durable, plain = statistics.median(totals["durable"]), statistics.median(totals["no fsync"])
    print(f"| save (median of saves 2..{args.saves}, {args.rounds} runs) | durable | no fsync | ratio |")
    print("|---|---|---|---|")
    print(f"| seconds | {durable:.3f} | {plain:.3f} | {durable / plain:.2f}x |")
    print(f"rank 0's wait for its fsyncs after the last file (median): {statistics.median(waits):.3f} s")


if __name__ == "__main__":
    main()
