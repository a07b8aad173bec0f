"""`megacoca data synth-shapes|from-folder|inspect`: make and inspect webdataset shards."""

from __future__ import annotations

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
    synth.add_argument("--two-object-fraction", type=fraction, default=0.4, help="train images with two objects")
    synth.add_argument("--workers", type=at_least(1), default=None, help="processes (default: all cores)")
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


def _synth_shapes(args) -> int:
    from megacoca.data.shapes import synth_shapes  # heavy (torch, PIL): in the command, not at `--help`

    if args.train_samples + args.val_samples == 0:
        raise ConfigError("--train-samples and --val-samples are both 0: nothing to write")
    meta = synth_shapes(args.out, args.train_samples, args.val_samples, args.image_size, args.seed,
                        args.shard_size, args.format, args.two_object_fraction, args.workers)
    total = args.train_samples + args.val_samples
    print(f"synth-shapes: {args.train_samples} train + {args.val_samples} val samples "
          f"({meta['train_shards']} + {meta['val_shards']} shards) in {args.out}, "
          f"{total / max(meta['seconds'], 1e-9):.0f} images/s")
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
