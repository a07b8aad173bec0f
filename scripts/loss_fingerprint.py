"""Train a tiny CoCa for a few steps under several layouts (1, 2 and 4 ranks) through the public CLI and print,
per layout, every step's losses and grad norm to full precision: a refactor that must not change behaviour is
checked by running this before and after and comparing the two JSON files bit for bit.

    python scripts/loss_fingerprint.py --out before.json          # on the old tree
    python scripts/loss_fingerprint.py --out after.json           # on the new tree
    python scripts/loss_fingerprint.py --compare before.json after.json

Each layout runs `megacoca train` (one process) or `deepspeed --num_gpus N --module megacoca.train` on
synth-shapes data written once into --work; about 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

TINY = {
    "model": {"overrides": {"image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 2,
                            "vision_heads": 2, "vision_mlp_dim": 64, "caption_queries": 8, "pooler_heads": 2,
                            "context_length": 12, "text_width": 32, "text_heads": 2, "text_mlp_dim": 64,
                            "text_layers": 1, "decoder_layers": 1, "embed_dim": 32}},
    "schedule": {"steps": 4, "global_batch_size": 16, "warmup_steps": 1},
    "logging": {"log_every": 1, "tensorboard": False},
    "checkpoint": {"every": 0, "save_final": False},
    "eval": {"every": 0},
}

# name: (ranks, --set overrides)
LAYOUTS = {
    "1rank_zero0_fp32_accum2": (1, ["parallel.deepspeed_config=zero0_fp32", "schedule.micro_batch_size=8"]),
    "1rank_zero3_bf16": (1, ["parallel.deepspeed_config=zero3_bf16", "schedule.micro_batch_size=16"]),
    "dp2_zero3_fp32_accum2": (2, ["parallel.deepspeed_config=zero3_fp32", "schedule.micro_batch_size=4"]),
    "tp2_zero1_bf16": (2, ["parallel.tp=2", "parallel.deepspeed_config=zero1_bf16", "schedule.micro_batch_size=8"]),
    "pp2_zero1_fp32": (2, ["parallel.pp=2", "parallel.deepspeed_config=zero0_fp32",
                           "parallel.deepspeed_overrides.zero_optimization.stage=1", "schedule.micro_batch_size=4"]),
    "pp2_zero3_bf16_keep": (2, ["parallel.pp=2", "parallel.deepspeed_config=zero3_bf16",
                                "parallel.pipeline_keep_gathered=true", "parallel.text_ahead=0",
                                "schedule.micro_batch_size=4"]),
    "tp2_dp2_zero3_bf16": (4, ["parallel.tp=2", "parallel.deepspeed_config=zero3_bf16",
                               "schedule.micro_batch_size=4"]),
    "pp2_dp2_zero2_bf16": (4, ["parallel.pp=2", "parallel.deepspeed_config=zero2_bf16",
                               "schedule.micro_batch_size=4"]),
    "pp2_tp2_zero1_fp32": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.deepspeed_config=zero0_fp32",
                               "parallel.deepspeed_overrides.zero_optimization.stage=1",
                               "schedule.micro_batch_size=4"]),
    "pp4_zero0_fp32": (4, ["parallel.pp=4", "parallel.deepspeed_config=zero0_fp32", "schedule.micro_batch_size=4",
                           "model.overrides.vision_layers=4"]),
}
KEYS = ("loss", "loss_contrastive", "loss_caption", "grad_norm", "lr")


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def make_data(work: str) -> str:
    shapes = os.path.join(work, "shapes")
    if not os.path.isdir(os.path.join(shapes, "train")):
        subprocess.run([sys.executable, "-m", "megacoca", "data", "synth-shapes", "--out", shapes,
                        "--train-samples", "128", "--val-samples", "16", "--image-size", "32", "--shard-size",
                        "16", "--workers", "1"], check=True, capture_output=True, env=_env())
    config = os.path.join(work, "tiny.json")
    with open(config, "w") as f:
        json.dump(TINY, f)
    return config


def run_layout(name: str, work: str, config: str, extra: list[str] = ()) -> list[dict]:
    ranks, overrides = LAYOUTS[name]
    overrides = [*overrides, *extra]
    run_dir = os.path.join(work, name)
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start each run afresh
    args = ["--config", config, "--train-shards", os.path.join(work, "shapes", "train"), "--run-dir", run_dir]
    for override in overrides:
        args += ["--set", override]
    if ranks == 1:
        command = [sys.executable, "-m", "megacoca.train", *args]
    else:
        command = ["deepspeed", "--num_gpus", str(ranks), "--master_port", _port(), "--module", "megacoca.train",
                   *args]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"loss"' in line]
    return [{"step": r["step"], **{key: r.get(key) for key in KEYS}} for r in records]


def compare(before: str, after: str) -> int:
    with open(before) as f:
        old = json.load(f)
    with open(after) as f:
        new = json.load(f)
    bad = 0
    for name in sorted(set(old) | set(new)):
        same = old.get(name) == new.get(name)
        bad += not same
        print(f"{name:28s} {'bit-identical' if same else 'DIFFERS'}")
        if not same:
            print(f"  before: {old.get(name)}\n  after:  {new.get(name)}")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the losses of every layout here (JSON)")
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    parser.add_argument("--only", nargs="*", help="layouts to run (default all)", choices=sorted(LAYOUTS))
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every layout (e.g. optim.caption_weight=0)")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    work = args.work or tempfile.mkdtemp(prefix="megacoca_fingerprint_")
    config = make_data(work)
    results = {}
    for name in args.only or LAYOUTS:
        results[name] = run_layout(name, work, config, args.extra)
        print(name, json.dumps(results[name][-1]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
