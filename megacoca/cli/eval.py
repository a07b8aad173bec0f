"""`megacoca eval`: evaluate a checkpoint on shards, write the metrics as JSON, optionally draw curves.

Three modes: `--shards` (synth-shapes zero-shot, retrieval and captions: megacoca.eval.runner.evaluate);
`--shards --class-names F --templates F [--label-field cls|FIELD]` (zero-shot top-1/top-5 of a labelled set:
megacoca.eval.labelled, the metrics at the top level of the JSON); `--config F` (each named set of its
`eval.val_sources`, the JSON's `sources: {name: metrics}`).
"""

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
                    "recall@1/5/10, greedy captions and their correctness (synth-shapes). With --class-names and "
                    "--templates: zero-shot top-1/top-5 of a labelled (ImageNet-style) set. With --config: every "
                    "named set of its eval.val_sources.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="DeepSpeed checkpoint dir (or one tag dir) of any layout, model dir or open_clip dir")
    parser.add_argument("--shards", default=None, type=argument(inputs.shards),
                        help="shard spec: a dir, a file, a brace pattern (or give --config)")
    parser.add_argument("--class-names", default=None, type=argument(_class_names),
                        help="classify --shards zero-shot as a labelled set: a file of class names, one per line "
                             "(or a JSON list), in label order (examples/zeroshot/)")
    parser.add_argument("--templates", default=None, type=argument(_templates),
                        help="with --class-names: a file of prompt templates with {} or {c} for the name, one per "
                             "line (or a JSON list); each class is the mean over all of them")
    parser.add_argument("--label-field", default=None, metavar="cls|FIELD",
                        help="with --class-names: where a sample's label is: 'cls' (its .cls file, the default) or "
                             "a field of its .json (an integer id or a class name)")
    parser.add_argument("--config", default=None, type=argument(lambda path: inputs.readable_file(path, "config file")),
                        help="a YAML/JSON job config: evaluate every named set of its eval.val_sources")
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


def _class_names(path: str) -> list[str]:
    from megacoca.data.source_text import read_class_names  # heavy (webdataset): not at `--help`

    inputs.readable_file(path, "class names file")
    return read_class_names(path)


def _templates(path: str) -> list[str]:
    from megacoca.data.source_text import read_templates  # heavy (webdataset): not at `--help`

    inputs.readable_file(path, "templates file")
    return read_templates(path)


def _val_sources(args) -> list | None:
    """The named sets to evaluate (ValSourceConfigs), each checked (one ConfigError line naming it): --config's
    eval.val_sources, or --shards with --class-names/--templates as one label set; None for today's --shards eval."""
    from megacoca.config.recipes import build_config
    from megacoca.config.sources import ValSourceConfig

    if bool(args.class_names) != bool(args.templates):
        raise ConfigError("--class-names and --templates go together (a labelled set needs both)")
    if args.label_field is not None and not args.class_names:
        raise ConfigError("--label-field needs --class-names and --templates (it says where a labelled set's "
                          "labels are)")
    if args.config and (args.shards or args.class_names):
        raise ConfigError("--config evaluates its eval.val_sources: give --config, or --shards (with "
                          "--class-names/--templates), not both")
    if not (args.config or args.shards):
        raise ConfigError("nothing to evaluate: give --shards (a dir, a file, a brace pattern) or --config")
    if args.config:
        job = build_config(config_file=args.config)
        if not job.eval.val_sources:
            raise ConfigError(f"{args.config} has no eval.val_sources to evaluate (a list of named sets: name, "
                              "shards, text, ...)")
        sources, key = job.eval.val_sources, "eval.val_sources"
    elif args.class_names:
        if args.label_field == "":
            raise ConfigError("--label-field is empty: 'cls' (the .cls file) or a .json field name")
        sources = [ValSourceConfig(name="shards", shards=args.shards, text="labels", class_names=args.class_names,
                                   templates=args.templates, label_field=args.label_field or "cls")]
        key = "--shards"
    else:
        return None
    if args.generative_zeroshot and any(source.text == "labels" for source in sources):
        raise ConfigError("--generative-zeroshot scores synth-shapes captions: not a labelled set's classes")
    for index, source in enumerate(sources):
        _check_source(source, key if args.class_names else f"{key}[{index}] ({source.name!r})")
    return sources


def _check_source(source, where: str) -> None:
    """A named set's files: its shards, a label set's class-name and template files, and one valid label among the
    first samples of a local label set (megacoca.eval.labelled.label_problem)."""
    from megacoca.data.source_text import text_rule  # heavy (torch): after the arguments are parsed
    from megacoca.eval.labelled import label_problem

    inputs.keyed(where if where == "--shards" else f"{where}.shards", inputs.shards, source.shards)
    if source.text != "labels":
        return
    if where != "--shards":
        inputs.keyed(f"{where}.class_names", _class_names, source.class_names)
        inputs.keyed(f"{where}.templates", _templates, source.templates)
    problem = label_problem(source.shards, text_rule(source))
    if problem:
        raise ConfigError(f"{where}: {problem}")


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
    sources = _val_sources(args)  # None: the --shards eval of synth-shapes and captions
    import torch  # heavy (torch and the model): after the arguments are known to be good, not at `--help`

    from megacoca.data.tokenizer import load_tokenizer
    from megacoca.eval.runner import evaluate, load_eval_set, load_model_for_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    try:
        model = load_model_for_eval(args.checkpoint, model_config=model_config)
        tokenizer = load_tokenizer(args.tokenizer, model.cfg.context_length)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is "
                             f"{model.cfg.vocab_size}; wrong --tokenizer?")
        eval_set = load_eval_set(args.shards, model.cfg.image_size, args.max_samples) if sources is None else None
    except (FileNotFoundError, ValueError) as error:
        print(f"megacoca eval: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    loaded = time.perf_counter()
    if sources is None:
        results = evaluate(model, tokenizer, eval_set, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           caption_samples=args.caption_samples, generative_zeroshot=args.generative_zeroshot)
        results["shards"] = args.shards
    else:
        try:
            per_source = _evaluate_sources(model, tokenizer, sources, args)
        except ValueError as error:  # a set none of whose samples can be scored
            print(f"megacoca eval: error: {' '.join(str(error).split())}", file=sys.stderr)
            return 2
        results = {"sources": per_source, "config": args.config, "timings": {}} if args.config else \
            {**per_source["shards"], "shards": args.shards}
    results["checkpoint"] = os.path.abspath(args.checkpoint)
    results["timings"]["load_s"] = round(loaded - began, 3)
    results["timings"]["total_s"] = round(time.perf_counter() - began, 3)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if args.curves:
        from megacoca.eval.plots import plot_curves  # heavy: matplotlib

        plot_curves(args.metrics, args.curves, final_eval=results)
    if args.config:
        for name, source_results in results["sources"].items():
            print(f"== {name} ==")
            _print_results(source_results)
    else:
        _print_results(results)
    print(f"eval took {results['timings']['total_s']:.1f}s"
          + (f"; wrote {args.out}" if args.out else "") + (f", {args.curves}" if args.curves else ""),
          file=sys.stderr)
    return 0


def _evaluate_sources(model, tokenizer, sources, args) -> dict:
    """{name: metrics} of each named set: a label set's zero-shot top-1/top-5 (megacoca.eval.labelled), a caption
    set's `evaluate`. --max-samples caps every set (the smaller of it and the set's own max_samples)."""
    from megacoca.data.source_text import text_rule
    from megacoca.eval.labelled import direct, zeroshot_labelled
    from megacoca.eval.runner import evaluate, load_eval_set

    results = {}
    for source in sources:
        rule = text_rule(source)
        limits = [n for n in (source.max_samples, args.max_samples) if n]
        limit = min(limits) if limits else 0  # 0: all
        if source.text == "labels":
            results[source.name] = zeroshot_labelled(direct(model), tokenizer, source.shards, rule,
                                                     model.cfg.image_size, batch_size=args.batch_size,
                                                     max_samples=limit)
        else:
            eval_set = load_eval_set(source.shards, model.cfg.image_size, limit or None, rule)
            results[source.name] = evaluate(model, tokenizer, eval_set, batch_size=args.batch_size,
                                            max_new_tokens=args.max_new_tokens, caption_samples=args.caption_samples,
                                            generative_zeroshot=args.generative_zeroshot)
        results[source.name]["shards"] = source.shards
    return results


def _print_results(results: dict) -> None:
    from megacoca.eval.labelled import labelled_headline
    from megacoca.eval.runner import headline

    if "num_classes" in results:  # a labelled set
        print(labelled_headline(results))
        return
    print(headline(results))
    for sample in results["samples"][:5]:
        mark = {True: "ok ", False: "bad", None: "   "}[sample["match"]]
        print(f"  [{mark}] {sample['generated']!r}  (ref: {sample['reference']!r})")
