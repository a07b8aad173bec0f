"""`megacoca tokenizer train|encode`: train SentencePiece on a shard spec's captions, or try a tokenizer."""

from __future__ import annotations

import json
import re
import time

from megacoca.cli import inputs
from megacoca.cli.inputs import argument, at_least
from megacoca.config.overrides import ConfigError


def register(subparsers) -> None:
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



def _captions(spec):
    from megacoca.data.shard_reader import decode_caption, iter_samples  # heavy (torch): not at --help

    for raw in iter_samples(spec):
        caption, reason = decode_caption(raw)
        if reason is None:
            yield caption


def _tokenizer_train(args) -> int:
    from megacoca.data.tokenizer import Tokenizer, train_sentencepiece  # heavy: see _captions

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
    from megacoca.data.tokenizer import load_tokenizer  # heavy: see _captions

    tokenizer = load_tokenizer(args.tokenizer, args.context_length)
    ids = tokenizer.encode(args.texts)
    for text, row in zip(args.texts, ids):
        used = row[row != tokenizer.pad_id].tolist()
        print(json.dumps({"text": text, "ids": used, "decoded": tokenizer.decode(row)}))
    return 0
