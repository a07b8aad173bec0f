"""Cached greedy captioning (megacoca) against open_clip's generate on the same weights.

open_clip re-runs the text tower and the multimodal decoder over the whole prefix for every new token (it
encodes the image once); megacoca runs the image towers once and each new token through per-layer KV caches.
Both produce 30-token captions: open_clip's `generate(seq_len=30, generation_type="top_k", top_k=1)` (sot, 28
tokens, and a forced eot at position 29 when a row is still running, 29 model calls) against megacoca's
`generate(max_new_tokens=29)` (29 calls); min_seq_len=5 <-> min_new_tokens=4. The two run alternately in one
process on the same threads, after one untimed warm-up call each on the same batch; the result is the median
of `--repeats` timed calls per side, and the tokens of the two must be identical (or the script stops). Not a
test; prints the command, torch's version, the thread count, the load average and the ratios.

    python benchmarks/generate_vs_open_clip.py                     # coca_ViT-B-32, batch 1 and 8, 2 threads
    python benchmarks/generate_vs_open_clip.py --batches 1 8 --repeats 3 --threads 1

Goal (issue 4): at least 5x faster than open_clip's generate. (open_clip needs transformers < 4.56.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="coca_ViT-B-32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=30, help="open_clip's seq_len: sot + 29 tokens")
    args = parser.parse_args()

    import sys

    import open_clip
    import torch

    from megacoca.models.coca import CoCa
    from megacoca.models.coca.generate import generate
    from megacoca.models.coca.open_clip import CLIP_BPE_IDS, config_from_open_clip, from_open_clip

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    theirs = open_clip.create_model(args.model, pretrained=None).eval()
    with torch.no_grad():
        projection = theirs.text_decoder.text_projection
        projection.normal_(std=projection.shape[0] ** -0.5)
    cfg = config_from_open_clip(args.model, kernels="auto")
    ours = CoCa(cfg).eval()
    ours.load_state_dict(from_open_clip(theirs.state_dict(), cfg), strict=True)
    sot, eot, pad = CLIP_BPE_IDS["bos_id"], CLIP_BPE_IDS["eos_id"], CLIP_BPE_IDS["pad_id"]
    min_seq_len = 5

    def run_open_clip(images):
        return theirs.generate(images, seq_len=args.seq_len, generation_type="top_k", top_k=1, min_seq_len=min_seq_len,
                               sot_token_id=sot, eos_token_id=eot, pad_token_id=pad)

    def run_megacoca(images):
        return generate(ours, images, max_new_tokens=args.seq_len - 1, min_new_tokens=min_seq_len - 1, bos_id=sot,
                        eos_id=eot, pad_id=pad)

    print("python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]))
    print(f"{args.model}, {args.threads} threads, fp32, torch {torch.__version__}, "
          f"{args.seq_len - 1} new tokens per caption, load average {os.getloadavg()[0]:.1f}")
    for batch in args.batches:
        images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(batch))
        times = {"open_clip": [], "megacoca": []}
        outputs = {}
        with torch.no_grad():
            run_open_clip(images)  # the same untimed warm-up for both (allocator, first-call costs)
            run_megacoca(images)
            for _ in range(args.repeats):
                for name, fn in (("open_clip", run_open_clip), ("megacoca", run_megacoca)):
                    start = time.perf_counter()
                    outputs[name] = fn(images)
                    times[name].append(time.perf_counter() - start)
        width = args.seq_len - 1
        a = torch.nn.functional.pad(outputs["open_clip"], (0, max(0, width - outputs["open_clip"].shape[1])))[:, :width]
        b = torch.nn.functional.pad(outputs["megacoca"], (0, max(0, width - outputs["megacoca"].shape[1])))[:, :width]
        if not torch.equal(a, b):
            raise SystemExit(f"batch {batch}: the two produced different tokens; no ratio to report")
        t_oc, t_mc = statistics.median(times["open_clip"]), statistics.median(times["megacoca"])
        print(f"batch {batch}: open_clip {t_oc:.3f} s, megacoca {t_mc:.3f} s (medians of {args.repeats}) -> "
              f"{t_oc / t_mc:.1f}x faster (goal >= 5x); identical tokens; load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
