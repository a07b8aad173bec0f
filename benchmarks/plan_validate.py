"""The planner's predictions (megacoca.plan.memory, megacoca.plan.timing) against measurements of real training steps
(benchmarks/plan_measure.py's JSON): peak memory per rank, and step time under a calibrated CPU profile.

    .venv/bin/python benchmarks/plan_measure.py --json /tmp/fitted.json              # measure (2-3 min each)
    .venv/bin/python benchmarks/plan_measure.py --holdout --model small long_text --json /tmp/holdout.json
    .venv/bin/python benchmarks/plan_measure.py --fresh --model open_clip_odd small --json /tmp/fresh.json
    .venv/bin/python -m megacoca plan --calibrate /tmp/cpu2.json --ranks 2            # a profile per world size
    .venv/bin/python -m megacoca plan --calibrate /tmp/cpu4.json --ranks 4
    .venv/bin/python benchmarks/plan_validate.py /tmp/fitted.json /tmp/holdout.json /tmp/fresh.json \\
        --profile 2=/tmp/cpu2.json --profile 4=/tmp/cpu4.json

Prints one markdown table per file (measured and predicted peak MB per rank with the predicted moment, measured
and predicted step seconds) and, per model, the Spearman rank correlation of the layouts' step times and whether
the fastest agree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from itertools import groupby

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from plan_measure import MODELS  # noqa: E402

from megacoca.config.layout import Layout  # noqa: E402
from megacoca.config.model import CoCaConfig  # noqa: E402
from megacoca.plan.job import job_inputs  # noqa: E402
from megacoca.plan.memory import ZeroBuffers, predict  # noqa: E402
from megacoca.plan.profile import DeviceProfile  # noqa: E402
from megacoca.plan.timing import predict_time  # noqa: E402


def model_of(data: dict, row: dict) -> CoCaConfig:
    """The measured row's model: from the file (plan_measure.py writes every model's config), else by name."""
    if row["model"] in data.get("models", {}):
        return CoCaConfig.from_dict(data["models"][row["model"]])
    return MODELS[row["model"]]


def layout_of(row: dict, cfg: CoCaConfig) -> tuple[Layout, ZeroBuffers]:
    """The planner's Layout and buffers for a measured row: its config overrides as the trainer reads them."""
    return job_inputs(row["overrides"], row["world_size"], cfg)


def spearman(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 1.0
    rank = lambda values: {i: r for r, i in enumerate(sorted(range(n), key=lambda i: values[i]))}  # noqa: E731
    rx, ry = rank(xs), rank(ys)
    return 1 - 6 * sum((rx[i] - ry[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="benchmarks/plan_measure.py --json outputs")
    parser.add_argument("--profile", action="append", default=[], metavar="WORLD=PATH",
                        help="a calibrated profile for layouts of that many ranks (repeatable); none: memory only")
    parser.add_argument("--record", metavar="PATH", default=None,
                        help="write the timed rows (model, overrides, measured and predicted seconds) as the time "
                             "check's record (tests/unit/plan/data/step_times.json)")
    args = parser.parse_args(argv)
    profiles = {int(k): DeviceProfile.load(v) for k, v in (item.split("=", 1) for item in args.profile)}
    worst_memory, timed, record = 0.0, [], {"models": {}, "rows": []}
    for path in args.json:
        data = json.load(open(path))
        print(f"\n{os.path.basename(path)}: {data['header']}\n")
        print("| model | layout | rank (dp,pp,tp) | measured peak MB | predicted MB | ratio | predicted moment "
              "| measured step s | predicted s | ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row in data["layouts"]:
            cfg = model_of(data, row)
            layout, buffers = layout_of(row, cfg)
            memory = predict(cfg, layout, buffers)
            profile = profiles.get(row["world_size"])
            seconds = predict_time(cfg, layout, profile).seconds if profile else None
            ranks = row["ranks"] if isinstance(row["ranks"], list) else [row["ranks"]]
            measured_s = max(rank["step_time_s"] for rank in ranks)
            seen = set()
            for rank in ranks:
                stage = memory[rank.get("pp_rank", 0)]
                key = (rank.get("pp_rank", 0), round(rank["peak_bytes"], -4))
                if key in seen:
                    continue  # identical ranks (data-parallel peers) once
                seen.add(key)
                ratio = stage.peak / rank["peak_bytes"]
                worst_memory = max(worst_memory, abs(ratio - 1))
                coords = f"{rank['rank']} ({rank['dp_rank']},{rank['pp_rank']},{rank['tp_rank']})"
                time_cells = (f"{measured_s:.3f} | {seconds:.3f} | {seconds / measured_s:.2f}" if seconds else
                              f"{measured_s:.3f} | - | -")
                print(f"| {row['model']} | {row['layout']} | {coords} | {rank['peak_bytes'] / 1e6:.2f} | "
                      f"{stage.peak / 1e6:.2f} | {ratio:.3f} | {stage.phase} | {time_cells} |")
            if seconds:
                timed.append((row["model"], row["layout"], measured_s, seconds, row["world_size"],
                              os.path.basename(path)))
                record["models"][row["model"]] = cfg.to_dict()
                record["rows"].append({"model": row["model"], "layout": row["layout"], "world_size": row["world_size"],
                                       "overrides": row["overrides"], "measured_s": round(measured_s, 5),
                                       "recorded_ratio": round(seconds / measured_s, 4),
                                       "peaks": [{"rank": r["rank"], "pp_rank": r.get("pp_rank", 0),
                                                  "peak_bytes": r["peak_bytes"]} for r in ranks],
                                       "plan": row.get("plan"), "measured": data["header"]})
    print(f"\nmemory: largest deviation {100 * worst_memory:.1f}% over every rank of every layout")
    if timed:
        for name in [*dict.fromkeys(r[5] for r in timed), None]:
            for world in sorted({r[4] for r in timed}):
                ratios = [p / m for _, _, m, p, w, f in timed if w == world and name in (f, None)]
                if ratios:
                    within = sum(abs(r - 1) <= 0.25 for r in ratios)
                    print(f"time, {name or 'all'}, {world} ranks: predicted / measured {min(ratios):.2f}-"
                          f"{max(ratios):.2f}, {within} of {len(ratios)} layouts within 25%")
        for model, group in groupby(sorted(timed), key=lambda r: r[0]):
            rows = list(group)
            rho = spearman([r[2] for r in rows], [r[3] for r in rows])
            measured, predicted = min(rows, key=lambda r: r[2]), min(rows, key=lambda r: r[3])
            print(f"  {model}: Spearman {rho:.2f} over {len(rows)} layouts; fastest measured {measured[1]}, "
                  f"predicted {predicted[1]} (measured {100 * (predicted[2] / measured[2] - 1):.0f}% slower than "
                  f"the fastest)")
    if args.record:
        errors = [abs(math.log(row["recorded_ratio"])) for row in record["rows"]]
        record["recorded_mean_abs_log_ratio"] = round(sum(errors) / max(len(errors), 1), 4)
        record["recorded_within_25_percent"] = sum(abs(row["recorded_ratio"] - 1) <= 0.25 for row in record["rows"])
        record["command"] = " ".join(["benchmarks/plan_validate.py", *sys.argv[1:]] if argv is None else argv)
        with open(args.record, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.record}: {len(record['rows'])} timed layouts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
