"""Training step of megacoca against open_clip on the same open_clip-layout model, weights and batch.

A step is forward, CoCa loss (2 x caption + 1 x contrastive), backward and AdamW, in fp32 on CPU threads.
Three sides run in alternating fresh processes, `--rounds` times (open_clip, megacoca, megacoca-full,
open_clip, ...):
- open_clip: open_clip's CoCa and CoCaLoss;
- megacoca: megacoca's model as it trains by default, which drops the batch's trailing all-pad text positions
  (`trim_text_padding`; exact, but open_clip does not do it);
- megacoca-full: the same with `trim_text_padding=False`, every step over all 76 positions as open_clip.
Each process runs one untimed warm-up step, then `--steps` timed steps, and reports the median step time and
its peak RSS (ru_maxrss: the whole process, imports and weight loading included). The result per side is the
median over its rounds; the first-step losses of every process must agree (to 1e-5 relative), or the script
stops: the sides must compute the same thing.

    python benchmarks/train_step_vs_open_clip.py                      # coca_ViT-B-32, batch 8, 2 threads, 3 rounds
    python benchmarks/train_step_vs_open_clip.py --model coca_ViT-B-32 --batch 8 --steps 4 --rounds 5
    python benchmarks/train_step_vs_open_clip.py --text full           # no padding: every caption 76 tokens

`--text captions` (default) tokenizes ordinary image captions with the CLIP BPE, so most of the 76 positions
are padding, as in real CoCa training data. Goal (issue 4): megacoca <= 0.8x open_clip's step time and no more
than its peak memory. Not a test; prints ratios, the command line, torch's version and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CAPTIONS = [
    "a man riding a wave on top of a surfboard",
    "two dogs playing with a frisbee in a grassy park on a sunny afternoon",
    "a plate of food with broccoli, rice and a piece of grilled chicken",
    "a red double decker bus driving down a city street next to tall buildings",
    "a cat sleeping on a laptop keyboard",
    "a group of people standing around a kitchen counter preparing a large meal together for a party",
    "an airplane flying over a snowy mountain range",
    "a small child holding an umbrella in the rain while wearing yellow boots",
]


IMPLS = ("open_clip", "megacoca", "megacoca-full")


def make_batch(cfg: dict, batch: int, text_mode: str, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    size = cfg["vision_cfg"].get("image_size", 224)
    images = torch.randn(batch, 3, size, size, generator=generator)
    context = cfg["text_cfg"].get("context_length", 76)
    if text_mode == "full":
        text = torch.randint(1, 49406, (batch, context), generator=generator)
        text[:, 0], text[:, -1] = 49406, 49407
    else:
        from megacoca.data.tokenizer import ClipBpeTokenizer

        text = ClipBpeTokenizer(context).encode([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
    return images, text


def prepare(args, workdir: str) -> dict:
    """Random open_clip weights (decoder projection initialised), the same weights in megacoca's layout, a batch."""
    import open_clip
    import torch

    from megacoca.models.coca.open_clip import config_from_open_clip, from_open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None)
    with torch.no_grad():
        projection = model.text_decoder.text_projection
        projection.normal_(std=projection.shape[0] ** -0.5)
    state = model.state_dict()
    open_clip_config = open_clip.get_model_config(args.model)
    cfg = config_from_open_clip(open_clip_config, kernels="auto")
    paths = {
        "open_clip_state": os.path.join(workdir, "open_clip.pt"),
        "megacoca_state": os.path.join(workdir, "megacoca.pt"),
        "batch": os.path.join(workdir, "batch.pt"),
    }
    torch.save(state, paths["open_clip_state"])
    torch.save(from_open_clip(state, cfg), paths["megacoca_state"])
    torch.save(make_batch(open_clip_config, args.batch, args.text), paths["batch"])
    paths["megacoca_config"] = cfg.to_dict()
    del model, state
    return paths


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    paths = json.loads(args.paths)
    images, text = torch.load(paths["batch"], weights_only=True)
    if args.worker == "open_clip":
        import open_clip
        from open_clip.loss import CoCaLoss

        model = open_clip.create_model(args.model, pretrained=None)
        model.load_state_dict(torch.load(paths["open_clip_state"], mmap=True, weights_only=True), strict=True)
        loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)

        def compute_loss():
            clip_loss, caption_loss = loss_fn(**model(images, text))
            return clip_loss + caption_loss
    else:
        from megacoca.config.model import CoCaConfig
        from megacoca.losses import CoCaLoss
        from megacoca.models.coca import CoCa

        cfg = CoCaConfig.from_dict(paths["megacoca_config"])
        model = CoCa(cfg.replace(trim_text_padding=args.worker == "megacoca"))
        model.load_state_dict(torch.load(paths["megacoca_state"], mmap=True, weights_only=True), strict=True)
        loss_fn = CoCaLoss(contrastive_weight=1.0, caption_weight=2.0)

        def compute_loss():
            return loss_fn(model(images, text))[0]

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    times, first_loss = [], None
    for step in range(args.steps + 1):  # step 0 warms up
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = compute_loss()
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if step == 0:
            first_loss = loss.item()
        else:
            times.append(elapsed)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB
    print(json.dumps({"impl": args.worker, "step_s": statistics.median(times), "times": times,
                      "peak_rss_gb": peak_gb, "first_loss": first_loss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="coca_ViT-B-32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of one process per side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text", choices=("captions", "full"), default="captions")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    command = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="megacoca_bench_") as workdir:
        paths = prepare(args, workdir)
        results: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        for round_index in range(args.rounds):
            for impl in IMPLS:
                worker_command = [sys.executable, __file__, "--worker", impl, "--paths", json.dumps(paths),
                                  "--model", args.model, "--steps", str(args.steps), "--threads", str(args.threads)]
                output = subprocess.run(worker_command, env=env, check=True, capture_output=True, text=True).stdout
                record = json.loads(output.strip().splitlines()[-1])
                results[impl].append(record)
                print(f"round {round_index} {impl:14s}: step {record['step_s']:.3f} s (median of "
                      f"{len(record['times'])}), peak RSS {record['peak_rss_gb']:.2f} GB, "
                      f"first loss {record['first_loss']:.6f}", flush=True)
    first_losses = [r["first_loss"] for records in results.values() for r in records]
    spread = (max(first_losses) - min(first_losses)) / abs(first_losses[0])
    if spread > 1e-5:
        raise SystemExit(f"the sides disagree on the first step's loss ({min(first_losses):.6f} .. "
                         f"{max(first_losses):.6f}): not the same computation, no ratio to report")
    step = {impl: statistics.median(r["step_s"] for r in records) for impl, records in results.items()}
    peak = {impl: max(r["peak_rss_gb"] for r in records) for impl, records in results.items()}
    load_after = os.getloadavg()[0]
    print(f"\n{command}")
    print(f"{args.model}, batch {args.batch}, text={args.text}, {args.threads} threads, fp32, torch {torch.__version__}, "
          f"{args.rounds} rounds x {args.steps} timed steps, load average {load_before:.1f} before / "
          f"{load_after:.1f} after; first loss {first_losses[0]:.6f} on every side")
    print(f"{'side':14s} {'s/step':>8s} {'ratio':>7s} {'peak RSS GB':>12s} {'ratio':>7s}   per-round medians")
    for impl in IMPLS:
        rounds = ", ".join(f"{r['step_s']:.3f}" for r in results[impl])
        print(f"{impl:14s} {step[impl]:8.3f} {step[impl] / step['open_clip']:7.3f} {peak[impl]:12.2f} "
              f"{peak[impl] / peak['open_clip']:7.3f}   {rounds}")
    print("ratios are megacoca / open_clip (goal: step <= 0.8, peak RSS <= 1.0); megacoca trims trailing padding, "
          "megacoca-full does not")


if __name__ == "__main__":
    main()
