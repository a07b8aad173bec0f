"""`megacoca data synth-shapes|from-folder|inspect` and `megacoca tokenizer train|encode`."""

from __future__ import annotations

import json
import re
import time

from megacoca.config import inputs
from megacoca.config.inputs import argument, at_least, fraction


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

    tok = subparsers.add_parser("tokenizer", help="train or try a tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="TOKENIZER_COMMAND", required=True)

    train = tok_sub.add_parser("train", help="train SentencePiece on the captions of a shard spec (pad 0, unk 1, bos 2, eos 3)")
    train.add_argument("--shards", required=True, type=argument(inputs.shards),
                       help="shard spec: dir, brace pattern, file, url")
    # 4 special pieces + at least one more; the corpus's distinct characters set the real minimum (see below)
    train.add_argument("--vocab-size", type=at_least(5), required=True,
                       help="a soft limit: small corpora get fewer pieces")
    train.add_argument("--output", required=True, type=argument(inputs.output_file),
                       help="output prefix: writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--model-type", choices=("bpe", "unigram", "word", "char"), default="bpe",
                       help="bpe (default: unigram under-uses the vocabulary on small caption sets)")
    train.add_argument("--max-sentences", type=at_least(1), default=2_000_000)
    train.set_defaults(func=_tokenizer_train)

    encode = tok_sub.add_parser("encode", help="encode and decode a few texts")
    encode.add_argument("--tokenizer", required=True, type=argument(inputs.tokenizer),
                        help='"clip-bpe" or a SentencePiece .model path')
    encode.add_argument("--context-length", type=at_least(2), default=None)
    encode.add_argument("texts", nargs="+")
    encode.set_defaults(func=_tokenizer_encode)


def _synth_shapes(args) -> int:
    from megacoca.config.train import ConfigError
    from megacoca.data.shapes import synth_shapes

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
    from megacoca.data.from_folder import folder_to_shards

    result = folder_to_shards(args.images, args.out, captions=args.captions, sidecar=args.sidecar,
                              shard_size=args.shard_size, shuffle=not args.no_shuffle, seed=args.seed)
    print(f"from-folder: {result['written']} samples in {len(result['shards'])} shards in {args.out}; "
          f"skipped {result['skipped'] or 'none'}")
    return 0 if result["written"] else 1


def _inspect(args) -> int:
    from megacoca.data.shards import decode_caption, image_bytes, iter_samples

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


def _captions(spec):
    from megacoca.data.shards import decode_caption, iter_samples

    for raw in iter_samples(spec):
        caption, reason = decode_caption(raw)
        if reason is None:
            yield caption


def _tokenizer_train(args) -> int:
    from megacoca.config.train import ConfigError
    from megacoca.data.tokenizer import Tokenizer, train_sentencepiece

    began = time.perf_counter()
    try:
        path = train_sentencepiece(_captions(args.shards), args.output, args.vocab_size,
                                   model_type=args.model_type, max_sentences=args.max_sentences)
    except RuntimeError as error:
        # What only the captions can tell (too few of them, more distinct characters than --vocab-size): one line
        # from SentencePiece's "INTERNAL: src/trainer_interface.cc(638) [check] Message."
        text = str(error)
        needed = re.search(r"required_chars\. \d+ vs (\d+)", text)
        if needed:
            raise ConfigError(f"--vocab-size {args.vocab_size} is below the {needed.group(1)} pieces the captions "
                              "need (their distinct characters + 4 special pieces)") from None
        if "sentences_.empty()" in text:
            raise ConfigError(f"--shards {args.shards}: no captions to train on") from None
        raise ConfigError(f"SentencePiece training failed: {' '.join(text.split('] ', 1)[-1].split())}") from None
    tokenizer = Tokenizer(path)
    print(f"tokenizer: {path} (vocab {tokenizer.vocab_size}, pad {tokenizer.pad_id} bos {tokenizer.bos_id} "
          f"eos {tokenizer.eos_id}) in {time.perf_counter() - began:.1f}s")
    return 0


def _tokenizer_encode(args) -> int:
    from megacoca.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, args.context_length)
    ids = tokenizer.encode(args.texts)
    for text, row in zip(args.texts, ids):
        used = row[row != tokenizer.pad_id].tolist()
        print(json.dumps({"text": text, "ids": used, "decoded": tokenizer.decode(row)}))
    return 0
