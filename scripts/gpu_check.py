"""The one prepared check for a lent GPU (issue 24): every figure megacoca needs from a CUDA device, in under 8
minutes, with no network, each part stopped at its own time limit so that a slow part cannot eat the rest.

    make gpu-bundle                                   # here (with network): wheels for what the GPU machine lacks
    make gpu-check OUT=/path/out                      # there: a venv from the bundle, then this script
    python scripts/gpu_check.py --out OUT [--parts env,kernel_tests,...] [--smoke]

Parts (each a subprocess of this script with its limit in seconds; its rows are written as it goes, so a part that
times out keeps what it measured):
- env (10): torch, CUDA, triton, the driver and the device.
- kernel_tests (140): tests/kernels compiled on the GPU (TRITON_INTERPRET=0; one tile config per kernel,
  MEGACOCA_KERNELS_TUNE=0, so ~125 kernel variants compile once each), JUnit XML and a pass/fail count; the log is
  written as the tests run, so a part stopped at its limit keeps their progress.
- bench (90): `python -m megacoca_kernels.bench`: attention forward/backward against SDPA's flash backend on
  CoCa's shapes (head dims 64 and 88), the linear cross-entropy's time and peak against torch, LayerNorm GB/s.
- calibrate (60): `megacoca plan --calibrate` on one GPU (megacoca.profiling.calibrate).
- train (150): coca_base (and coca_large where it fits) training steps in bf16 on one GPU through megacoca's
  Trainer and DeepSpeed: samples/s, MFU (megacoca.metrics.flops: matmul FLOPs x 3, attention scores included,
  recompute not, over the device's dense bf16 peak), peak memory; the Triton kernels against torch's, the text tower
  overlapped and not, ZeRO-2 and ZeRO-3 on one rank; each beside the planner's prediction for the same layout on the
  GPU's preset and on the profile `calibrate` wrote.
- generate (25): cached greedy caption generation (megacoca.models.coca.generate) at batch 1 and 64, tokens/s.
Every part writes OUT/<part>.csv; OUT/summary.md gathers them into short markdown tables with each part's status
(ok, failed with its exit code, timed out after its limit, skipped). With --smoke everything runs on CPU at tiny
sizes (Triton's interpreter, coca_tiny, a quick calibration) to check the script itself (tests/e2e/test_gpu_check.py);
a figure only a GPU gives reads "not measured: no CUDA device".
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_CUDA = "not measured: no CUDA device"
# (part, seconds): the order they run in; 475 s of limits (under 8 minutes with this script's own few seconds)
PARTS = [("env", 10), ("kernel_tests", 140), ("bench", 90), ("calibrate", 60), ("train", 150), ("generate", 25)]


def _write_csv(path: str, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _append(path: str, row: dict) -> None:
    """One row more in a part's CSV (rewritten whole: the header grows with new keys)."""
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    _write_csv(path, [*rows, row])


# --- the parts (each runs in its own process) -----------------------------------------------------------------


def part_env(out: str, smoke: bool) -> None:
    import torch

    row = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda or "none",
           "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        row["triton"] = triton.__version__
    except ImportError:
        row["triton"] = "not installed"
    try:
        import deepspeed

        row["deepspeed"] = deepspeed.__version__
    except Exception as error:  # noqa: BLE001 - an import that fails is what this row reports
        row["deepspeed"] = f"import failed: {error}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        row.update(device=props.name, memory_gb=round(props.total_memory / 1e9, 1),
                   capability=f"{props.major}.{props.minor}")
        try:
            row["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            row["driver"] = "nvidia-smi not found"
    else:
        row.update(device=NO_CUDA, memory_gb=NO_CUDA, capability=NO_CUDA, driver=NO_CUDA)
    row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    _write_csv(os.path.join(out, "env.csv"), [row])


def part_kernel_tests(out: str, smoke: bool) -> None:
    # compiled: one tile config per kernel (MEGACOCA_KERNELS_TUNE=0), correctness not speed (bench times them)
    env = dict(os.environ, TRITON_INTERPRET="1" if smoke else "0", MEGACOCA_KERNELS_TUNE="0")
    junit = os.path.join(out, "kernel_tests.xml")
    selection = ["tests/kernels/test_layer_norm.py", "-k", "not large"] if smoke else ["tests/kernels"]
    started = time.perf_counter()
    log = os.path.join(out, "kernel_tests.log")
    with open(log, "w") as f:  # streamed: a part stopped at its limit keeps the tests' progress
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *selection,
                                 f"--junitxml={junit}"], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    counts = _junit_counts(junit)
    with open(log) as f:
        tail = f.read().strip().splitlines()
    _write_csv(os.path.join(out, "kernel_tests.csv"), [{
        "mode": "interpreter (smoke)" if smoke else "compiled (TRITON_INTERPRET=0, one tile config)", **counts,
        "exit_code": result.returncode, "seconds": round(time.perf_counter() - started, 1),
        "last_line": tail[-1] if tail else ""}])


def _junit_counts(path: str) -> dict:
    import xml.etree.ElementTree as ElementTree

    if not os.path.exists(path):
        return {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def part_bench(out: str, smoke: bool) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1" if smoke else "0")
    command = [sys.executable, "-m", "megacoca_kernels.bench", "--csv", os.path.join(out, "bench.csv")]
    result = subprocess.run(command + (["--smoke"] if smoke else []), cwd=REPO, env=env, capture_output=True,
                            text=True)
    with open(os.path.join(out, "bench.log"), "w") as f:
        f.write(result.stdout + result.stderr)
    if result.returncode:
        raise SystemExit(f"megacoca_kernels.bench exited {result.returncode}")


def part_calibrate(out: str, smoke: bool) -> None:
    from megacoca.plan.profile import save_profile
    from megacoca.profiling.calibrate import calibrate

    started = time.perf_counter()
    profile = calibrate(ranks=1, quick=smoke, timeout=55)
    save_profile(profile, os.path.join(out, "profile.json"))
    _write_csv(os.path.join(out, "calibrate.csv"), [{
        "profile": profile.name, **{f"matmul_{k}_tflops": round(v / 1e12, 2) for k, v in profile.matmul_flops.items()},
        "memory_bw_gbs": round(profile.memory_bw / 1e9, 1), "seconds": round(time.perf_counter() - started, 1)}])


def train_cases(smoke: bool) -> list[dict]:
    """The single-GPU runs: (flavor, DeepSpeed config, kernels, text overlap)."""
    if smoke:
        return [dict(flavor="coca_tiny", ds="zero2_bf16", kernels="torch", overlap="auto", micro=2),
                dict(flavor="coca_tiny", ds="zero2_bf16", kernels="torch", overlap="off", micro=2),
                dict(flavor="coca_tiny", ds="zero3_bf16", kernels="torch", overlap="auto", micro=2)]
    base = dict(flavor="coca_base", micro=32)
    return [dict(base, ds="zero2_bf16", kernels="auto", overlap="auto"),
            dict(base, ds="zero2_bf16", kernels="auto", overlap="off"),
            dict(base, ds="zero2_bf16", kernels="torch", overlap="auto"),
            dict(base, ds="zero3_bf16", kernels="auto", overlap="auto"),
            dict(flavor="coca_large", micro=16, ds="zero2_bf16", kernels="auto", overlap="auto")]


def part_train(out: str, smoke: bool) -> None:
    import torch
    import torch.distributed as dist

    from megacoca.config.flavors import get_flavor
    from megacoca.metrics.flops import train_flops_per_sample
    from megacoca.metrics.peak import peak_flops
    from megacoca.profiling.measure import build_measured_trainer

    cuda = torch.cuda.is_available() and not smoke
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    store = tempfile.NamedTemporaryFile(prefix="gpu_check_store_", delete=False).name
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=0, world_size=1)
    warmup, timed = (1, 2) if smoke else (3, 6)
    path = os.path.join(out, "train.csv")
    for case in train_cases(smoke):
        cfg = get_flavor(case["flavor"], kernels=case["kernels"])
        row = {key: case[key] for key in ("flavor", "ds", "kernels", "overlap", "micro")}
        overrides = [f"parallel.deepspeed_config={case['ds']}", f"parallel.overlap_text_tower={case['overlap']}",
                     f"schedule.micro_batch_size={case['micro']}", f"schedule.global_batch_size={case['micro']}"]
        if case["ds"].startswith("zero3"):
            overrides.append("parallel.deepspeed_overrides.zero_optimization.stage3_param_persistence_threshold=0")
        row["overrides"] = " ".join(overrides)
        trainer = None
        try:
            with tempfile.TemporaryDirectory(prefix="gpu_check_run_") as run_dir:
                trainer = build_measured_trainer(overrides, 1, cfg, run_dir)
                row["overlap_on"] = getattr(trainer, "text_overlapped", False)
                batches = iter(trainer.train_loader)
                for _ in range(warmup):
                    trainer.train_step(batches)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                for _ in range(timed):
                    trainer.train_step(batches)
                if cuda:
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - started) / timed
        except torch.cuda.OutOfMemoryError as error:
            row.update(status=f"out of memory: {str(error).splitlines()[0][:120]}")
            _append(path, row)
            continue
        finally:
            if trainer is not None:
                trainer.close()
            if cuda:
                torch.cuda.empty_cache()
        samples = case["micro"] / seconds
        row.update(status="ok", step_s=round(seconds, 4), samples_per_s=round(samples, 2))
        if cuda:
            name = torch.cuda.get_device_name()
            peak = peak_flops(name, "bf16")
            row["mfu"] = round(train_flops_per_sample(cfg) * samples / peak, 4) if peak else "unknown device"
            row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        else:
            row.update(mfu=NO_CUDA, peak_memory_gb=NO_CUDA)
        _append(path, row)
    dist.destroy_process_group()


def part_generate(out: str, smoke: bool) -> None:
    import torch

    from megacoca.config.flavors import get_flavor
    from megacoca.models.coca import CoCa
    from megacoca.models.coca.generate import generate

    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    cfg = get_flavor("coca_tiny" if smoke else "coca_base", kernels="torch" if smoke else "auto")
    torch.manual_seed(0)
    model = CoCa(cfg).to(device=device, dtype=torch.bfloat16 if cuda else torch.float32).eval()
    new_tokens = 8 if smoke else 30
    for batch in (1, 4) if smoke else (1, 64):
        images = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device,
                             dtype=next(model.parameters()).dtype)
        with torch.no_grad():
            generate(model, images, max_new_tokens=2, min_new_tokens=2, bos_id=1, eos_id=2)  # warm-up
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            captions = generate(model, images, max_new_tokens=new_tokens, min_new_tokens=new_tokens, bos_id=1,
                                eos_id=2)
            if cuda:
                torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        _append(os.path.join(out, "generate.csv"), {
            "flavor": "coca_tiny" if smoke else "coca_base",
            "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "batch": batch,
            "new_tokens": captions.shape[1] - 1, "seconds": round(seconds, 4),
            "tokens_per_s": round(batch * new_tokens / seconds, 1),
            "ms_per_token": round(1e3 * seconds / new_tokens, 2)})


PART_FUNCTIONS = {"env": part_env, "kernel_tests": part_kernel_tests, "bench": part_bench,
                  "calibrate": part_calibrate, "train": part_train, "generate": part_generate}


# --- predictions beside the measured runs, and the summary (the parent process) --------------------------------


def predictions(out: str) -> None:
    """train.csv's rows with the planner's predicted step for the same layout: on the GPU's preset and on the
    profile `calibrate` wrote (when both exist)."""
    path = os.path.join(out, "train.csv")
    if not os.path.exists(path):
        return
    from megacoca.config.flavors import get_flavor
    from megacoca.plan.job import job_inputs
    from megacoca.plan.presets import gpu_preset
    from megacoca.plan.profile import DeviceProfile
    from megacoca.plan.timing import predict_time

    env = _read(os.path.join(out, "env.csv"))
    device = env[0].get("device", "") if env else ""
    memory = float(env[0]["memory_gb"]) * 1e9 if env and env[0].get("memory_gb", "").replace(".", "").isdigit() else 0
    device_type = "cuda" if env and env[0].get("cuda_available") == "True" else "cpu"
    profiles = {"preset": gpu_preset(device, memory)}
    if os.path.exists(os.path.join(out, "profile.json")):
        profiles["calibrated"] = DeviceProfile.load(os.path.join(out, "profile.json"))
    rows = _read(path)
    for row in rows:
        if row.get("status") != "ok":
            continue
        cfg = get_flavor(row["flavor"], kernels=row["kernels"])
        layout, _ = job_inputs(row["overrides"].split(), 1, cfg, device_type)
        measured = float(row["step_s"])
        for name, profile in profiles.items():
            if profile is None:
                row[f"{name}_predicted_s"] = "no preset for this device" if name == "preset" else ""
                continue
            predicted = predict_time(cfg, layout, profile).seconds
            row[f"{name}_predicted_s"] = round(predicted, 4)
            row[f"{name}_ratio"] = round(predicted / measured, 3)
    _write_csv(path, rows)


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def summary(out: str, status: dict, smoke: bool) -> str:
    sections = [f"# megacoca GPU check{' (smoke run on CPU: not a measurement)' if smoke else ''}", "",
                _markdown([{"part": p, "status": s} for p, s in status.items()])]
    titles = {"env": "Environment", "kernel_tests": "Kernel tests",
              "bench": "Kernel benchmarks (megacoca_kernels.bench)",
              "calibrate": "Calibration (megacoca plan --calibrate, one GPU)",
              "train": "Training steps on one GPU (bf16; MFU: matmul FLOPs x 3 incl. attention scores, no recompute, "
                       "over the dense bf16 peak)", "generate": "Cached caption generation (greedy)"}
    for part, title in titles.items():
        rows = _read(os.path.join(out, f"{part}.csv"))
        sections += ["", f"## {title}", ""]
        if not rows:
            sections.append(f"(none: {status.get(part, 'not run')})")
        elif part == "bench":  # the goals' verdicts; every row is in bench.csv
            with open(os.path.join(out, "bench.log")) as f:
                verdicts = [line.rstrip() for line in f if line.startswith(("PASS", "FAIL", "n/a"))]
            sections += [f"{len(rows)} rows in bench.csv; against the goals in megacoca_kernels/bench.py:", "",
                         *(f"- {line}" for line in verdicts)]
        else:
            sections.append(_markdown(rows, [c for c in rows[0] if c != "overrides"]))
    text = "\n".join(sections) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the CSVs and summary.md (created)")
    parser.add_argument("--parts", default=",".join(p for p, _ in PARTS),
                        help=f"comma-separated subset of {', '.join(p for p, _ in PARTS)}")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check this script, measure nothing")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--limit-scale", type=float, default=1.0, help="multiply every part's time limit")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.part:
        PART_FUNCTIONS[args.part](args.out, args.smoke)
        return 0
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PART_FUNCTIONS]
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PART_FUNCTIONS)}")
    status = {}
    started = time.perf_counter()
    for part, limit in PARTS:
        if part not in wanted:
            status[part] = "skipped"
            continue
        limit = limit * args.limit_scale
        t0 = time.perf_counter()
        command = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--part", part]
        try:
            result = subprocess.run(command + (["--smoke"] if args.smoke else []), cwd=REPO, timeout=limit,
                                    capture_output=True, text=True)
            status[part] = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
            log = result.stdout + result.stderr
        except subprocess.TimeoutExpired as expired:
            status[part] = f"timed out after {limit:.0f} s (rows written so far kept)"
            log = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace")
        with open(os.path.join(args.out, f"{part}.stdout.log"), "w") as f:
            f.write(log)
        status[part] += f", {time.perf_counter() - t0:.0f} s"
        print(f"[gpu-check] {part}: {status[part]}", flush=True)
    try:
        predictions(args.out)
    except Exception as error:  # noqa: BLE001 - a summary with the measured rows beats none
        status["predictions"] = f"failed: {error}"
    print(summary(args.out, status, args.smoke))
    print(f"[gpu-check] {time.perf_counter() - started:.0f} s in all; {args.out}/summary.md", flush=True)
    with open(os.path.join(args.out, "status.json"), "w") as f:
        json.dump(status, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
