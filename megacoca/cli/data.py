"""`megacoca data synth-shapes|from-folder|inspect|stats`: make and inspect webdataset shards and mixtures."""

from __future__ import annotations

import tarfile

from megacoca.cli import inputs
from megacoca.cli.inputs import argument, at_least, fraction
from megacoca.config.overrides import ConfigError


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="make and inspect webdataset shards")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    synth = data_sub.add_parser("synth-shapes", help="write the synthetic captioned-shapes set (train/ and val/ shards)")
    synth.add_argument("--out", required=True, type=argument(inputs.output_dir),
                       help="output directory (gets train/, val/, meta.json)")
    synth.add_argument("--train-samples", type=at_least(0), default=20000)
    synth.add_argument("--val-samples", type=at_least(0), default=1200)
    synth.add_argument("--image-size", type=at_least(16), default=64)
    synth.add_argument("--seed", type=at_least(0), default=0)
    synth.add_argument("--shard-size", type=at_least(1), default=1000, help="samples per shard")
    synth.add_argument("--format", choices=("jpg", "png"), default="jpg")
    synth.add_argument("--two-object-fraction", type=fraction, default=None,
                       help="train images with two objects (default 0.4)")
    synth.add_argument("--workers", type=at_least(1), default=None, help="processes (default: all cores)")
    synth.add_argument("--labels-only", action="store_true",
                       help="write a label-only source instead: single-object images with a .cls class id and no "
                            "caption (other images than the captioned set's), plus classnames.txt and templates.txt")
    synth.set_defaults(func=_synth_shapes)

    folder = data_sub.add_parser("from-folder", help="a folder of images plus captions -> shards")
    folder.add_argument("--images", required=True, type=argument(inputs.images_dir),
                        help="folder of images (searched recursively)")
    source = folder.add_mutually_exclusive_group(required=True)
    source.add_argument("--captions", type=argument(inputs.captions_file),
                        help=".csv or .jsonl with columns file|image and caption|text")
    source.add_argument("--sidecar", action="store_true", help="read IMAGE.txt next to each image")
    folder.add_argument("--out", required=True, type=argument(inputs.output_dir),
                        help="output directory for {00000..}.tar")
    folder.add_argument("--shard-size", type=at_least(1), default=10000)
    folder.add_argument("--no-shuffle", action="store_true", help="keep the listing order (default: seeded shuffle)")
    folder.add_argument("--seed", type=at_least(0), default=0)
    folder.set_defaults(func=_from_folder)

    inspect = data_sub.add_parser("inspect", help="count samples and show a few captions of a shard spec")
    inspect.add_argument("--shards", required=True, type=argument(inputs.shards))
    inspect.add_argument("--show", type=at_least(0), default=3)
    inspect.set_defaults(func=_inspect)

    stats = data_sub.add_parser(
        "stats", help="shards, samples and weight share of each source of a mixture, and what an epoch of each costs",
        description="Per source: shards, samples (tar headers grouped by key), weight share, and the mixture samples "
                    "drawn until it has read one epoch, with every other source's epochs by then; the largest is "
                    "one epoch of every source.")
    given = stats.add_mutually_exclusive_group(required=True)
    given.add_argument("--config", type=argument(lambda path: inputs.readable_file(path, "config file")),
                       help="a YAML/JSON job config: its data.sources (and schedule.global_batch_size for steps)")
    given.add_argument("--source", action="append", type=_source_spec, metavar="NAME=WEIGHT:SHARDS",
                       help="a source: its name, weight and shard spec, e.g. shapes=3:data/shapes/train (repeatable)")
    stats.set_defaults(func=_stats)


def _source_spec(text: str) -> tuple[str, float, str]:
    """argparse type of --source: NAME=WEIGHT:SHARDS -> (name, weight, shards); the shards are checked later."""
    import argparse
    import math

    name, _, rest = text.partition("=")
    weight, colon, spec = rest.partition(":")
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not name.strip() or not colon or not spec or not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT:SHARDS with a weight > 0 (e.g. "
                                         f"shapes=3:data/shapes/train), got {text!r}")
    return name.strip(), value, spec


def _synth_shapes(args) -> int:
    from megacoca.data.shapes import synth_shapes  # heavy (torch, PIL): in the command, not at `--help`

    if args.train_samples + args.val_samples == 0:
        raise ConfigError("--train-samples and --val-samples are both 0: nothing to write")
    if args.labels_only and args.two_object_fraction is not None:
        raise ConfigError("--two-object-fraction: a label-only set (--labels-only) holds single-object images only")
    two_objects = 0.4 if args.two_object_fraction is None else args.two_object_fraction
    meta = synth_shapes(args.out, args.train_samples, args.val_samples, args.image_size, args.seed,
                        args.shard_size, args.format, two_objects, args.workers, labels_only=args.labels_only)
    total = args.train_samples + args.val_samples
    kind = "label-only" if args.labels_only else "captioned"
    print(f"synth-shapes: {args.train_samples} train + {args.val_samples} val {kind} samples "
          f"({meta['train_shards']} + {meta['val_shards']} shards) in {args.out}, "
          f"{total / max(meta['seconds'], 1e-9):.0f} images/s")
    if args.labels_only:
        print(f"  class names {args.out}/classnames.txt, templates {args.out}/templates.txt (a `text: labels` source)")
    return 0


def _from_folder(args) -> int:
    from megacoca.data.from_folder import folder_to_shards  # heavy: see _synth_shapes

    result = folder_to_shards(args.images, args.out, captions=args.captions, sidecar=args.sidecar,
                              shard_size=args.shard_size, shuffle=not args.no_shuffle, seed=args.seed)
    print(f"from-folder: {result['written']} samples in {len(result['shards'])} shards in {args.out}; "
          f"skipped {result['skipped'] or 'none'}")
    return 0 if result["written"] else 1


def _inspect(args) -> int:
    from megacoca.data.shard_reader import decode_caption, image_bytes, iter_samples  # heavy: see _synth_shapes

    count, bad = 0, 0
    for raw in iter_samples(args.shards):
        caption, reason = decode_caption(raw)
        if reason or image_bytes(raw) is None:
            bad += 1
        elif count < args.show:
            print(f"{raw['__key__']}: {caption}")
        count += 1
    print(f"{count} samples ({bad} with a missing image or bad caption)")
    return 0


def _stats(args) -> int:
    from megacoca.data.stats import mixture_epochs, source_size  # heavy (webdataset): not at `--help`

    batch = None
    if args.config:
        from megacoca.config.recipes import build_config

        job = build_config(config_file=args.config)
        if not job.data.sources:
            raise ConfigError(f"{args.config} has no data.sources (a list of name, shards, weight, ...)")
        given = [(source.name, source.weight, source.shards) for source in job.data.sources]
        batch = job.schedule.global_batch_size
    else:
        given = args.source
        repeated = sorted({name for name, _, _ in given if [n for n, _, _ in given].count(name) > 1})
        if repeated:
            raise ConfigError(f"--source: the name {repeated[0]!r} is given twice: names must be unique")
    sizes = []
    for name, weight, spec in given:
        inputs.keyed(f"source {name!r}", inputs.shards, spec)
        try:
            sizes.append(source_size(name, spec, weight))
        except (OSError, ValueError, EOFError, tarfile.TarError) as error:  # a damaged or failed shard
            raise ConfigError(f"source {name!r}: cannot count its samples: {inputs.one_line(error)}") from None
    try:
        rows = mixture_epochs(sizes)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    width = max(len("source"), *(len(size.name) for size in sizes))
    print(f"{'source':<{width}} {'shards':>7} {'samples':>10} {'weight':>8} {'share':>7} {'drawn per epoch':>16}  "
          "epochs of each source by then")
    for size, row in zip(sizes, rows):
        epochs = ", ".join(f"{name} {value:.3g}" for name, value in row.epochs.items())
        print(f"{size.name:<{width}} {len(size.urls):>7} {size.samples:>10} {size.weight:>8.4g} {row.share:>7.3f} "
              f"{row.mixture_samples:>16.0f}  {epochs}")
    every = max(rows, key=lambda row: row.mixture_samples)
    steps = f" = {every.mixture_samples / batch:.1f} steps of global batch {batch}" if batch else ""
    print(f"one epoch of every source: {every.mixture_samples:.0f} mixture samples{steps} (set by {every.name!r})")
    return 0
