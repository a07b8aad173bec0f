"""The data mixture's cost (issue 27): loader throughput against one source, and the size of the loader state.

Throughput: synth-shapes shards (default 6000 train samples at 64 px, 250 per shard: 24 shards) are split into 3
sources of 8 shards each (symlinks), and the script times `ShardLoader` over all 24 shards against `MixtureLoader`
over the 3 sources (weights 0.5 / 0.3 / 0.2), with the same batch size, transform (`ImageTransform(64,
train=True)`), tokenizer and seed, for each `--workers` count. Each round builds a fresh loader, discards its first
batch (worker start) and times the next `--batches`; the two loaders alternate (ABBA) over `--rounds` rounds. Prints
every round, the medians and the median of the per-round ratios mixture / single (the issue's goal: at least 0.95),
by the wall clock and by CPU time (this process's and its workers': a figure other work on the machine disturbs
less).
Below 0.95 (or with `--profile`) it profiles both in-process (cProfile, 0 workers) and prints where the mixture
spends its extra time.

State: `MixturePosition` (megacoca.data.mixture_position) is built directly on fake url lists of
`--shards-per-source` shards for 3 sources (nothing is opened: `open` and `os.stat` raise while positions are built
and re-split), at each `--dp` size with `--state-workers` workers, fresh and after a re-split from states of another
dp size (every old stream inside its first shard, so the plan lists every shard of the epoch: the largest plan a
re-split makes), and the size of rank 0's `state_dict()` is measured as torch.save bytes and as JSON, with the time
of `load_resplit_state` and, in a second call, its peak Python memory (tracemalloc). The one-source
`LoaderPosition` of the same shards is measured the same way. Ends with a markdown table. Not a test. Figures:
docs/benchmarks.md, "Data mixtures".

    .venv/bin/python benchmarks/mixture_loader.py                       # both parts, shards in a temporary dir
    .venv/bin/python benchmarks/mixture_loader.py --only state --dp 512 1
    .venv/bin/python benchmarks/mixture_loader.py --only throughput --data /tmp/mixbench --profile
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megacoca.config.sources import SourceConfig  # noqa: E402
from megacoca.data.mixture_position import MixturePosition  # noqa: E402
from megacoca.data.position import LoaderPosition  # noqa: E402

WEIGHTS = (0.5, 0.3, 0.2)
GOAL = 0.95


# ---- throughput ---------------------------------------------------------------------------------------------
def write_shards(args) -> tuple[str, list[str]]:
    """(the directory of all shards, the 3 source directories), written under --data unless there already."""
    from megacoca.data.shapes import synth_shapes  # heavy (numpy, PIL, webdataset): not at --help

    train = os.path.join(args.data, "train")
    expected = -(-args.train_samples // args.shard_size)
    if not (os.path.isdir(train) and len([f for f in os.listdir(train) if f.endswith(".tar")]) == expected):
        synth_shapes(args.data, args.train_samples, 0, args.image_size, seed=0, shard_size=args.shard_size,
                     workers=os.cpu_count() or 1)
    shards = sorted(f for f in os.listdir(train) if f.endswith(".tar"))
    per_source = len(shards) // len(WEIGHTS)
    dirs = []
    for k in range(len(WEIGHTS)):
        source = os.path.join(args.data, f"source{k}")
        os.makedirs(source, exist_ok=True)
        for name in shards[k * per_source:(k + 1) * per_source]:
            link = os.path.join(source, name)
            if not os.path.lexists(link):
                os.symlink(os.path.join(train, name), link)
        dirs.append(source)
    return train, dirs


def make_loader(kind: str, train: str, dirs: list[str], args, workers: int):
    # heavy (torch, PIL, webdataset): not at --help
    from megacoca.data.mixture import MixtureLoader
    from megacoca.data.shards import ShardLoader
    from megacoca.data.source_text import text_rule
    from megacoca.data.tokenizer import load_tokenizer
    from megacoca.data.transforms import ImageTransform

    tokenizer = load_tokenizer(args.tokenizer, args.context)
    transform = ImageTransform(args.image_size, train=True)
    if kind == "single":
        return ShardLoader(train, args.batch, tokenizer, transform, num_workers=workers, seed=0)
    sources = [SourceConfig(name=f"s{k}", shards=d, weight=w) for k, (d, w) in enumerate(zip(dirs, WEIGHTS))]
    rules = {source.name: text_rule(source, 0) for source in sources}
    return MixtureLoader(sources, rules, args.batch, tokenizer, transform, num_workers=workers, seed=0)


def time_loader(loader, batches: int) -> tuple[float, float]:
    """(samples/s by the wall clock over `batches` batches after the first, which is discarded: worker start-up;
    samples/s by CPU time: every sample handed out over the CPU seconds of this process and of its finished
    worker processes, from the start of the iteration to the workers' exit, start-up included: a figure other
    work on the machine disturbs less)."""
    cpu = time.process_time() + _children_cpu()
    iterator = iter(loader)
    first = len(next(iterator)["keys"])
    began = time.perf_counter()
    samples = 0
    for _ in range(batches):
        samples += len(next(iterator)["keys"])
    seconds = time.perf_counter() - began
    del iterator  # stops and joins the workers
    gc.collect()
    cpu = time.process_time() + _children_cpu() - cpu
    return samples / seconds, (first + samples) / cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def throughput(args, train: str, dirs: list[str]) -> dict[int, dict]:
    """Per worker count: every round's samples/s of both loaders (by the wall clock and by CPU time), their medians
    and the medians of the per-round ratios mixture / single."""
    out = {}
    for workers in args.workers:
        rates = {"single": [], "mixture": []}
        cpu = {"single": [], "mixture": []}
        for r in range(args.rounds):
            order = ("single", "mixture") if r % 2 == 0 else ("mixture", "single")
            for kind in order:
                wall, by_cpu = time_loader(make_loader(kind, train, dirs, args, workers), args.batches)
                rates[kind].append(wall)
                cpu[kind].append(by_cpu)
            print(f"workers {workers} round {r + 1}: single {rates['single'][-1]:.0f} samples/s, mixture "
                  f"{rates['mixture'][-1]:.0f} samples/s, ratio {rates['mixture'][-1] / rates['single'][-1]:.3f}; "
                  f"by CPU time {cpu['single'][-1]:.0f} and {cpu['mixture'][-1]:.0f}, ratio "
                  f"{cpu['mixture'][-1] / cpu['single'][-1]:.3f}", flush=True)
        ratios = [m / s for m, s in zip(rates["mixture"], rates["single"])]
        cpu_ratios = [m / s for m, s in zip(cpu["mixture"], cpu["single"])]
        result = {"single": statistics.median(rates["single"]), "mixture": statistics.median(rates["mixture"]),
                  "ratio": statistics.median(ratios), "ratios": ratios, "rounds": rates,
                  "cpu_single": statistics.median(cpu["single"]), "cpu_mixture": statistics.median(cpu["mixture"]),
                  "cpu_ratio": statistics.median(cpu_ratios), "cpu_ratios": cpu_ratios, "cpu_rounds": cpu}
        print(f"workers {workers}: median single {result['single']:.0f}, mixture {result['mixture']:.0f} samples/s, "
              f"median ratio mixture/single {result['ratio']:.3f} (rounds: " + ", ".join(f"{x:.3f}" for x in ratios)
              + f"); by CPU time {result['cpu_single']:.0f} and {result['cpu_mixture']:.0f}, median ratio "
              f"{result['cpu_ratio']:.3f}", flush=True)
        out[workers] = result
    return out


def profile(args, train: str, dirs: list[str], top: int = 12) -> None:
    """cProfile both loaders in-process (0 workers) over the same batches: each one's hottest functions by own
    time, and the functions the mixture spends more own time in than the single source."""
    stats = {}
    for kind in ("single", "mixture"):
        loader = make_loader(kind, train, dirs, args, 0)
        profiler = cProfile.Profile()
        profiler.enable()
        time_loader(loader, args.batches)
        profiler.disable()
        stats[kind] = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
        total = sum(v[2] for v in stats[kind].values())
        print(f"\n{kind}: {total:.2f} s of own time in all; the hottest by own time:")
        for func, (_, calls, own, cumulative, _) in sorted(stats[kind].items(), key=lambda x: -x[1][2])[:top]:
            print(f"  {own:7.3f} s own {cumulative:7.3f} s cum {calls:8d} calls  {_where(func)}")
    single, mixture = stats["single"], stats["mixture"]
    extra = {func: mixture[func][2] - single.get(func, (0, 0, 0.0))[2] for func in mixture}
    print("\nwhere the mixture spends more own time than the single source (s):")
    for func, seconds in sorted(extra.items(), key=lambda x: -x[1])[:top]:
        print(f"  {seconds:+7.3f} s  ({single.get(func, (0, 0))[1]} -> {mixture[func][1]} calls)  {_where(func)}")


def _where(func) -> str:
    path, line, name = func
    return f"{name} ({os.path.relpath(path, REPO) if path.startswith(REPO) else os.path.basename(path)}:{line})"


# ---- state size ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def no_files():
    """`open`, `io.open` and `os.stat` raise inside: proves a position reads no shard."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a file was touched: {args[:1]}")

    saved = builtins.open, io.open, os.stat
    builtins.open = io.open = os.stat = refuse
    try:
        yield
    finally:
        builtins.open, io.open, os.stat = saved


def fake_urls(args) -> dict[str, list[str]]:
    return {f"s{k}": [f"/nonexistent/source{k}/{i:06d}.tar" for i in range(args.shards_per_source)]
            for k in range(len(WEIGHTS))}


def old_states(kind: str, urls: dict[str, list[str]], old_dp: int, workers: int, batch: int) -> list[dict]:
    """Every old dp rank's state, each stream `batch` samples into its first shard (the first batch consumed)."""
    weights = dict(zip(urls, WEIGHTS))
    states = []
    for rank in range(old_dp):
        if kind == "mixture":
            position = MixturePosition(urls, weights, batch, rank, old_dp, workers, 0)
            sources = list(position.sources.values())
            position.slots = batch * old_dp * max(workers, 1)
            position.batches = max(workers, 1)
        else:
            position = LoaderPosition(urls["s0"], batch, rank, old_dp, workers, 0)
            sources = [position]
            position.batches = max(workers, 1)
        for source in sources:
            source.streams = [{"epoch": 0, "shard": 0, "sample": batch, "skipped": {}} for _ in source.streams]
        states.append(position.state_dict())
    return states


def state_sizes(state: dict) -> tuple[int, int]:
    import torch  # heavy: not at --help

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes, len(json.dumps(state))


def measure_state(kind: str, urls: dict[str, list[str]], dp: int, old_dp: int, args) -> dict:
    """Rank 0's state at dp `dp`: its sizes fresh and after a re-split from every rank of a run at `old_dp`, and
    the re-split's time and peak memory."""
    workers, batch = args.state_workers, args.batch
    with no_files():
        if kind == "mixture":
            position = MixturePosition(urls, dict(zip(urls, WEIGHTS)), batch, 0, dp, workers, 0)
        else:
            position = LoaderPosition(urls["s0"], batch, 0, dp, workers, 0)
        fresh_state = position.state_dict()
        states = old_states(kind, urls, old_dp, workers, batch)
        began = time.perf_counter()
        position.load_resplit_state(states)
        seconds = time.perf_counter() - began
        tracemalloc.start()  # again, for the peak (tracemalloc slows allocations: not timed)
        position.load_resplit_state(states)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    state = position.state_dict()
    fresh = state_sizes(fresh_state)
    plans = state["sources"].values() if kind == "mixture" else [state]
    pieces = sum(len(p) for s in plans for p in s["plan"].values())
    old_bytes = sum(state_sizes(s)[0] for s in states[:1]) * old_dp  # the old ranks' states every new rank reads
    row = {"kind": kind, "dp": dp, "old_dp": old_dp, "workers": workers, "fresh_torch": fresh[0],
           "fresh_json": fresh[1], "resplit_torch": None, "resplit_json": None, "plan_pieces": pieces,
           "resplit_s": seconds, "resplit_peak_mb": peak / 2**20, "old_states_torch": old_bytes}
    row["resplit_torch"], row["resplit_json"] = state_sizes(state)
    print(f"{kind} dp {old_dp} -> {dp}, {workers} workers: fresh state {fresh[0] / 1024:.1f} KiB torch.save, "
          f"{fresh[1] / 1024:.1f} KiB JSON; after the re-split {row['resplit_torch'] / 1024:.1f} KiB torch.save, "
          f"{row['resplit_json'] / 1024:.1f} KiB JSON ({pieces} plan pieces); load_resplit_state {seconds:.2f} s, "
          f"peak {row['resplit_peak_mb']:.0f} MiB (tracemalloc), reading {old_dp} old states of "
          f"{old_bytes / old_dp / 1024:.1f} KiB", flush=True)
    return row


# ---- main ---------------------------------------------------------------------------------------------------
def table(speed: dict, states: list[dict]) -> str:
    lines = []
    if speed:
        lines += ["| workers | single samples/s | mixture samples/s | mixture / single (median of rounds) | goal |",
                  "|---|---|---|---|---|"]
        for workers, r in speed.items():
            verdict = "met" if r["ratio"] >= GOAL else "NOT met"
            lines.append(f"| {workers} | {r['single']:.0f} | {r['mixture']:.0f} | {r['ratio']:.3f} "
                         f"({min(r['ratios']):.3f}-{max(r['ratios']):.3f}) | >= {GOAL}: {verdict} |")
            lines.append(f"| {workers}, by CPU time | {r['cpu_single']:.0f} | {r['cpu_mixture']:.0f} | "
                         f"{r['cpu_ratio']:.3f} ({min(r['cpu_ratios']):.3f}-{max(r['cpu_ratios']):.3f}) | |")
        lines.append("")
    if states:
        lines += ["| loader state, rank 0 | dp (re-split from) | workers | fresh: torch.save / JSON KiB | after the "
                  "re-split: torch.save / JSON KiB | plan pieces | load_resplit_state s / peak MiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in states:
            what = "mixture, 3 sources" if r["kind"] == "mixture" else "one source"
            lines.append(f"| {what} | {r['dp']} ({r['old_dp']}) | {r['workers']} | {r['fresh_torch'] / 1024:.1f} / "
                         f"{r['fresh_json'] / 1024:.1f} | {r['resplit_torch'] / 1024:.1f} / "
                         f"{r['resplit_json'] / 1024:.1f} | {r['plan_pieces']} | {r['resplit_s']:.2f} / "
                         f"{r['resplit_peak_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("throughput", "state"))
    parser.add_argument("--data", help="shards go here (kept; default: a temporary directory, removed)")
    parser.add_argument("--train-samples", type=int, default=6000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=60, help="timed batches per round (after one discarded)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--tokenizer", default="clip-bpe")
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="profile even when the goal is met")
    parser.add_argument("--shards-per-source", type=int, default=10_000)
    parser.add_argument("--dp", type=int, nargs="+", default=[512, 1])
    parser.add_argument("--old-dp", type=int, nargs="+", default=[256, 2],
                        help="the dp size each --dp re-splits from, in order")
    parser.add_argument("--state-workers", type=int, default=8)
    parser.add_argument("--json", metavar="PATH", help="also write the figures")
    args = parser.parse_args(argv)
    if len(args.old_dp) != len(args.dp):
        parser.error("give one --old-dp per --dp")

    speed, states = {}, []
    if args.only != "state":
        with contextlib.ExitStack() as stack:
            if args.data is None:
                args.data = stack.enter_context(tempfile.TemporaryDirectory(prefix="mixture_loader_"))
            train, dirs = write_shards(args)
            print(f"{len(os.listdir(train))} shards of {args.shard_size} samples in {train}; sources "
                  + ", ".join(f"{d} ({w})" for d, w in zip(dirs, WEIGHTS)), flush=True)
            speed = throughput(args, train, dirs)
            if args.profile or any(r["ratio"] < GOAL for r in speed.values()):
                profile(args, train, dirs)
    if args.only != "throughput":
        urls = fake_urls(args)
        for dp, old_dp in zip(args.dp, args.old_dp):
            for kind in ("mixture", "single"):
                states.append(measure_state(kind, urls, dp, old_dp, args))
    print("\n" + table(speed, states))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "throughput": speed, "state": states}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
