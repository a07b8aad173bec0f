"""`megacoca eval`: evaluate a checkpoint on shards, write the metrics as JSON, optionally draw curves."""

from __future__ import annotations

import json
import os
import sys
import time

from megacoca.cli import inputs
from megacoca.cli.inputs import argument, at_least
from megacoca.config.overrides import ConfigError, parse_model_overrides
from megacoca.config.train import ModelChoice


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="zero-shot, retrieval and captioning metrics of a checkpoint on a set of shards",
        description="Evaluate a CoCa checkpoint (DeepSpeed checkpoint dir of a megacoca run, or a converted "
                    "model dir) on webdataset shards: zero-shot top-1 (synth-shapes classes), image<->text "
                    "recall@1/5/10, greedy captions and their correctness (synth-shapes).",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="DeepSpeed checkpoint dir (or one tag dir) of any layout, model dir or open_clip dir")
    parser.add_argument("--shards", required=True, type=argument(inputs.shards),
                        help="shard spec: a dir, a file, a brace pattern")
    parser.add_argument("--tokenizer", required=True, type=argument(inputs.tokenizer),
                        help="SentencePiece .model path or 'clip-bpe'")
    parser.add_argument("--out", default=None, type=argument(inputs.output_file), help="write the metrics JSON here")
    parser.add_argument("--max-samples", type=at_least(1), default=None, help="evaluate only the first N samples")
    parser.add_argument("--caption-samples", type=at_least(1), default=None,
                        help="caption only the first N (default all)")
    parser.add_argument("--batch-size", type=at_least(1), default=256)
    parser.add_argument("--max-new-tokens", type=at_least(1), default=20)
    parser.add_argument("--flavor", default=None,
                        help="model flavor, for a DeepSpeed checkpoint that does not record its config")
    parser.add_argument("--model-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="CoCaConfig override with --flavor (repeatable), e.g. vocab_size=512")
    parser.add_argument("--metrics", default=None,
                        type=argument(lambda path: inputs.readable_file(path, "metrics file")),
                        help="a run's metrics.jsonl: draw curves to --curves")
    parser.add_argument("--curves", default=None, type=argument(inputs.output_file),
                        help="PNG path for the loss/eval curves (needs --metrics)")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch intra-op threads")
    parser.add_argument("--generative-zeroshot", action="store_true",
                        help="also classify by caption likelihood (synth-shapes): what a captioning-only model can "
                             "be scored on")
    parser.set_defaults(func=run)


def _model_config(args):
    """The CoCaConfig of --flavor and --model-set (None without --flavor); a bad one is a ConfigError."""
    if not args.flavor:
        if args.model_set:
            raise ConfigError("--model-set needs --flavor (the checkpoint's own config is used without it)")
        return None
    choice = ModelChoice(flavor=args.flavor, overrides=parse_model_overrides(args.model_set, "--model-set"))
    try:
        return choice.build()
    except ConfigError as error:  # "model.flavor: ..." / "model.overrides: ...": name the arguments instead
        message = str(error).replace("model.flavor:", "--flavor:").replace("model.overrides:", "--model-set:")
        raise ConfigError(message) from None


def run(args) -> int:
    if args.curves and not args.metrics:
        raise ConfigError("--curves needs --metrics (a run's metrics.jsonl)")
    model_config = _model_config(args)  # before anything loads: a bad --flavor/--model-set is one line
    import torch  # heavy (torch and the model): after the arguments are known to be good, not at `--help`

    from megacoca.data.tokenizer import load_tokenizer
    from megacoca.eval.runner import evaluate, headline, load_eval_set, load_model_for_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    try:
        model = load_model_for_eval(args.checkpoint, model_config=model_config)
        tokenizer = load_tokenizer(args.tokenizer, model.cfg.context_length)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is "
                             f"{model.cfg.vocab_size}; wrong --tokenizer?")
        eval_set = load_eval_set(args.shards, model.cfg.image_size, args.max_samples)
    except (FileNotFoundError, ValueError) as error:
        print(f"megacoca eval: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    loaded = time.perf_counter()
    results = evaluate(model, tokenizer, eval_set, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                       caption_samples=args.caption_samples, generative_zeroshot=args.generative_zeroshot)
    results["checkpoint"] = os.path.abspath(args.checkpoint)
    results["shards"] = args.shards
    results["timings"]["load_s"] = round(loaded - began, 3)
    results["timings"]["total_s"] = round(time.perf_counter() - began, 3)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if args.curves:
        from megacoca.eval.plots import plot_curves  # heavy: matplotlib

        plot_curves(args.metrics, args.curves, final_eval=results)
    print(headline(results))
    for sample in results["samples"][:5]:
        mark = {True: "ok ", False: "bad", None: "   "}[sample["match"]]
        print(f"  [{mark}] {sample['generated']!r}  (ref: {sample['reference']!r})")
    print(f"eval took {results['timings']['total_s']:.1f}s"
          + (f"; wrote {args.out}" if args.out else "") + (f", {args.curves}" if args.curves else ""),
          file=sys.stderr)
    return 0
